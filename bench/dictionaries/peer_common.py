"""Helpers shared by the peer scripts. Runs in the PEERS' virtual environments: it imports only
torch, safetensors and (where asked) transformers / transformer_lens, never acgraph.

- :func:`load_inputs` / :func:`eval_acts` read what ``make_inputs.py`` wrote.
- :class:`FVU` is our metric, streamed in float64 (ANCHORS.md):
  ``FVU = E||y - y_hat||^2 / (E||y||^2 - ||E y||^2)`` over all eval tokens.
- :func:`hooked_transformer_from_hf` builds an *unprocessed* TransformerLens HookedTransformer
  for a local HF folder by hand (HookedTransformerConfig from the HF config + TL's weight
  converters; no LayerNorm folding, no centering), for GPT-2 and Llama-family models.
- :func:`peak_rss_mb`, :func:`write_json` (atomic), :func:`set_offline_env`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def set_offline_env() -> None:
    """No network at run time, no W&B (call before importing the peer)."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def load_inputs(data_dir: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    return {
        "meta": meta,
        "dir": data_dir,
        "model_dir": data_dir / meta["model_dir"],
        "tokens": load_file(str(data_dir / "tokens.safetensors")),
    }


def eval_acts(data_dir: str | Path, key: str, rows: int | None = None) -> torch.Tensor:
    """One hook's held-out activations (only the first ``rows`` rows if given).

    Loaded on demand, so the benchmark's peak RSS is not inflated by unused hooks."""
    from safetensors import safe_open

    with safe_open(str(Path(data_dir) / "eval_acts.safetensors"), framework="pt") as f:
        if key not in set(f.keys()):
            raise SystemExit(f"{key} has no eval activations in {data_dir} (re-run make_inputs)")
        if rows is None:
            return f.get_tensor(key)
        return f.get_slice(key)[:rows]


class FVU:
    """Fraction of variance unexplained, sums streamed in float64 (global mean, not per batch)."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_err = 0.0
        self.sq = 0.0
        self.sum: torch.Tensor | None = None

    def update(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        y = y.detach().double().reshape(-1, y.shape[-1])
        y_hat = y_hat.detach().double().reshape(-1, y.shape[-1])
        self.n += y.shape[0]
        self.sq_err += float((y - y_hat).pow(2).sum())
        self.sq += float(y.pow(2).sum())
        s = y.sum(0)
        self.sum = s if self.sum is None else self.sum + s

    def value(self) -> float:
        assert self.sum is not None and self.n > 0
        mean = self.sum / self.n
        variance = self.sq / self.n - float(mean.pow(2).sum())
        return (self.sq_err / self.n) / variance


def sparsity_stats(acts: torch.Tensor, fired: torch.Tensor | None = None) -> tuple[float, Any]:
    """(L0 of this batch, running 'ever fired' mask)."""
    active = acts != 0
    fired_now = active.any(0)
    fired = fired_now if fired is None else (fired | fired_now)
    return float(active.sum(-1).double().mean()), fired


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB): VmHWM. Not ru_maxrss where VmHWM exists:
    on Linux it keeps the parent's resident set at the fork across the exec, so a child of a
    large driver reports the driver's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment(packages: list[str]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "packages": versions,
        "argv": sys.argv,
    }


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- TransformerLens by hand


def _hooked_config_fields(hf: Any) -> tuple[dict[str, Any], str]:
    arch = (getattr(hf, "architectures", None) or [None])[0]
    if arch == "GPT2LMHeadModel":
        return {
            "d_model": hf.n_embd,
            "d_head": hf.n_embd // hf.n_head,
            "n_heads": hf.n_head,
            "d_mlp": hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd,
            "n_layers": hf.n_layer,
            "n_ctx": hf.n_positions,
            "eps": hf.layer_norm_epsilon,
            "d_vocab": hf.vocab_size,
            "act_fn": hf.activation_function,
            "use_attn_scale": bool(getattr(hf, "scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": bool(hf.scale_attn_by_inverse_layer_idx),
            "normalization_type": "LN",
            "positional_embedding_type": "standard",
        }, arch
    if arch == "LlamaForCausalLM":
        d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        n_kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        rope = getattr(hf, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
        return {
            "d_model": hf.hidden_size,
            "d_head": d_head,
            "n_heads": hf.num_attention_heads,
            "n_key_value_heads": n_kv if n_kv != hf.num_attention_heads else None,
            "d_mlp": hf.intermediate_size,
            "n_layers": hf.num_hidden_layers,
            "n_ctx": hf.max_position_embeddings,
            "eps": hf.rms_norm_eps,
            "d_vocab": hf.vocab_size,
            "act_fn": hf.hidden_act,
            "normalization_type": "RMS",
            "final_rms": True,
            "gated_mlp": True,
            "positional_embedding_type": "rotary",
            "rotary_dim": d_head,
            "rotary_base": theta,
            "rotary_adjacent_pairs": False,
        }, arch
    raise SystemExit(f"peer_common: no TransformerLens config recipe for {arch}")


def hooked_config_from_hf(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """HookedTransformerConfig for the HF folder (no hub lookups)."""
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(str(model_dir))
    fields, arch = _hooked_config_fields(hf_cfg)
    fields.update(
        model_name=Path(model_dir).name,
        original_architecture=arch,
        tokenizer_name=None,
        default_prepend_bos=False,  # contexts already start with BOS
        device="cpu",
        dtype=dtype,
    )
    return HookedTransformerConfig(**fields), hf_cfg


def convert_weights(hf_model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained.weight_conversions import (
        convert_gpt2_weights,
        convert_llama_weights,
    )

    if cfg.original_architecture == "GPT2LMHeadModel":
        return convert_gpt2_weights(hf_model, cfg)
    return convert_llama_weights(hf_model, cfg)


def load_tokenizer(model_dir: str | Path):
    """The folder's tokenizer (None if it has none); falls back to tokenizer.json alone."""
    model_dir = Path(model_dir)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:
        # transformers 4.x cannot read a transformers-5 tokenizer_config.json
        # ("TokenizersBackend"): load tokenizer.json directly and restore the special tokens.
        if (model_dir / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            special = {}
            config = model_dir / "tokenizer_config.json"
            if config.is_file():
                raw = json.loads(config.read_text())
                for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                    if isinstance(raw.get(key), str):
                        special[key] = raw[key]
            return PreTrainedTokenizerFast(
                tokenizer_file=str(model_dir / "tokenizer.json"), **special
            )
        return None


def hooked_transformer_from_hf(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An unprocessed HookedTransformer with the HF folder's weights, tokenizer attached."""
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    cfg, _ = hooked_config_from_hf(model_dir, dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    model = HookedTransformer(cfg)
    state = convert_weights(hf_model, cfg)
    params = dict(model.named_parameters())
    for name, param in params.items():  # biases the source lacks (Llama) are zero
        if name not in state:
            state[name] = torch.zeros_like(param)
    model.load_state_dict(state, strict=False)
    model.eval()
    tok = load_tokenizer(model_dir)
    model.tokenizer = tok
    if tok is not None:
        model.cfg.tokenizer_prepends_bos = len(tok.encode("")) > 0
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
    del hf_model
    return model
