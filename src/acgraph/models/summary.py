"""Describe a loaded HookedTransformer: shape, parameter count, where dictionaries attach."""

from __future__ import annotations

from typing import Any

from transformer_lens import HookedTransformer

from .configs import ARCHITECTURES

# Per-layer hook points a dictionary (SAE, transcoder) can read or write, by kind.
# ln2.hook_normalized is the MLP input (what a transcoder reads); hook_mlp_out what it writes.
LAYER_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_attn_out",
    "mlp.hook_post",
)


def hook_points(model: HookedTransformer) -> dict[str, list[str]]:
    """Full TransformerLens hook names per kind, layer order; kinds the model lacks are omitted
    (e.g. hook_resid_mid in parallel-residual models such as Pythia)."""
    available = model.hook_dict
    points: dict[str, list[str]] = {}
    for kind in LAYER_HOOKS:
        names = [f"blocks.{layer}.{kind}" for layer in range(model.cfg.n_layers)]
        names = [name for name in names if name in available]
        if names:
            points[kind] = names
    return points


def count_parameters(model: HookedTransformer) -> dict[str, int]:
    """`n_params`: the source model's count (what HF `num_parameters()` reports): tied
    embeddings once, without the all-zero biases TransformerLens adds where the architecture has
    none. `n_params_hooked`: every tensor the HookedTransformer holds."""
    hooked = 0
    source = 0
    arch = ARCHITECTURES.get(model.cfg.original_architecture or "")
    absent = arch.absent_params if arch else ()
    for name, param in model.named_parameters():
        hooked += param.numel()
        if name.endswith(absent) or (name == "unembed.W_U" and model.cfg.tie_word_embeddings):
            continue
        source += param.numel()
    return {"n_params": source, "n_params_hooked": hooked}


def model_summary(model: HookedTransformer) -> dict[str, Any]:
    """JSON-ready description of the model's shape."""
    cfg = model.cfg
    return {
        "name": cfg.model_name,
        "architecture": cfg.original_architecture or "HookedTransformer",
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        **count_parameters(model),
        "normalization": cfg.normalization_type,
        "positional_embedding": cfg.positional_embedding_type,
        "rotary_dim": cfg.rotary_dim if cfg.positional_embedding_type == "rotary" else None,
        "act_fn": cfg.act_fn,
        "gated_mlp": cfg.gated_mlp,
        "parallel_attn_mlp": cfg.parallel_attn_mlp,
        "tied_embeddings": cfg.tie_word_embeddings,
        "default_prepend_bos": cfg.default_prepend_bos,
        "has_tokenizer": model.tokenizer is not None,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": str(cfg.device),
    }


def model_info(model: HookedTransformer) -> dict[str, Any]:
    """Summary plus hook points: what `acg model info --json` prints."""
    return {**model_summary(model), "hook_points": hook_points(model)}


def format_model_info(info: dict[str, Any]) -> str:
    """Human-readable table of `model_info`; each hook kind shown once, L standing for the layer."""
    heads = f"{info['n_heads']} (KV heads {info['n_kv_heads']}), d_head {info['d_head']}"
    rotary = f" (rotary_dim {info['rotary_dim']})" if info.get("rotary_dim") else ""
    params = f"{info['n_params']:,} (HookedTransformer tensors: {info['n_params_hooked']:,})"
    rows = [
        ("name", info["name"]),
        ("architecture", info["architecture"]),
        ("layers", info["n_layers"]),
        ("d_model", info["d_model"]),
        ("heads", heads),
        ("d_mlp", f"{info['d_mlp']} ({info['act_fn']}{', gated' if info['gated_mlp'] else ''})"),
        ("vocab", info["d_vocab"]),
        ("context", info["n_ctx"]),
        ("parameters", params),
        ("normalization", info["normalization"]),
        ("positions", f"{info['positional_embedding']}{rotary}"),
        ("tied embeddings", info["tied_embeddings"]),
        ("tokenizer", "yes" if info["has_tokenizer"] else "none (pass token ids)"),
        ("prepend BOS", info["default_prepend_bos"]),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    last = info["n_layers"] - 1
    lines.append(f"hook points (L = 0..{last}):")
    lines += [f"  blocks.L.{kind}" for kind in info["hook_points"]]
    return "\n".join(lines)
