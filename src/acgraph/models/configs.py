"""HF config -> HookedTransformerConfig, one builder per supported architecture.

This is the only module that knows how each architecture maps onto TransformerLens. We build the
config ourselves (never through TransformerLens's hub lookups) so loading stays offline, and we
refuse variants whose weights TransformerLens's converters would silently drop (extra biases,
scaled RoPE, unknown activations) instead of producing a model that quietly differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_gpt2_weights,
    convert_llama_weights,
    convert_neox_weights,
)
from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

from acgraph.errors import UnsupportedArchitectureError

# TransformerLens parameters that some source architectures do not have (converters fill zeros).
# Excluded when counting the source model's parameters.
_LLAMA_ABSENT = ("attn.b_Q", "attn.b_K", "attn.b_V", "attn._b_K", "attn._b_V", "attn.b_O")
_LLAMA_ABSENT += ("mlp.b_in", "mlp.b_out", "unembed.b_U")


@dataclass(frozen=True)
class Architecture:
    """How one HF causal-LM class becomes a HookedTransformer."""

    name: str  # HF class name, e.g. "GPT2LMHeadModel"
    build_config: Callable[[Any], dict[str, Any]]  # HF config -> HookedTransformerConfig fields
    convert_weights: Callable[[torch.nn.Module, HookedTransformerConfig], dict[str, torch.Tensor]]
    absent_params: tuple[str, ...]  # TL parameter-name suffixes with no HF counterpart
    prepend_bos: Literal["if_bos_token", "as_tokenizer", "never"]


def gpt2_config(hf: Any) -> dict[str, Any]:
    if getattr(hf, "add_cross_attention", False):
        raise UnsupportedArchitectureError("GPT2LMHeadModel with cross-attention is not supported")
    return {
        "d_model": hf.n_embd,
        "d_head": hf.n_embd // hf.n_head,
        "n_heads": hf.n_head,
        "d_mlp": hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd,
        "n_layers": hf.n_layer,
        "n_ctx": hf.n_positions,
        "eps": hf.layer_norm_epsilon,
        "d_vocab": hf.vocab_size,
        "act_fn": _activation(hf.activation_function, "GPT2LMHeadModel"),
        "use_attn_scale": bool(getattr(hf, "scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": bool(hf.scale_attn_by_inverse_layer_idx),
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    }


def llama_config(hf: Any) -> dict[str, Any]:
    name = "LlamaForCausalLM"
    # convert_llama_weights reads no q/k/v/o or MLP biases: refuse models that have them.
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            raise UnsupportedArchitectureError(f"{name} with {flag}=True is not supported")
    _require_default_rope(hf, name)
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    return {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": hf.num_attention_heads,
        # None means plain multi-head attention in TL; a number switches on grouped-query attention.
        "n_key_value_heads": n_kv if n_kv != hf.num_attention_heads else None,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": _activation(hf.hidden_act, name),
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_base": _rope_value(hf, "rope_theta", 10000.0),
        "rotary_adjacent_pairs": False,  # HF rotates the two halves of each head, not pairs
    }


def neox_config(hf: Any) -> dict[str, Any]:
    name = "GPTNeoXForCausalLM"
    if not getattr(hf, "attention_bias", True):
        raise UnsupportedArchitectureError(f"{name} with attention_bias=False is not supported")
    _require_default_rope(hf, name)
    d_head = hf.hidden_size // hf.num_attention_heads
    rotary_pct = _rope_value(hf, "partial_rotary_factor", getattr(hf, "rotary_pct", 1.0))
    return {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": hf.num_attention_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.layer_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": _activation(hf.hidden_act, name),
        "normalization_type": "LN",
        "parallel_attn_mlp": bool(hf.use_parallel_residual),
        "positional_embedding_type": "rotary",
        "rotary_dim": int(rotary_pct * d_head),  # int(), not round(): what HF does
        "rotary_base": _rope_value(hf, "rope_theta", getattr(hf, "rotary_emb_base", 10000.0)),
        "rotary_adjacent_pairs": False,
    }


def _convert_neox(
    hf_model: torch.nn.Module, cfg: HookedTransformerConfig
) -> dict[str, torch.Tensor]:
    # transformers 5 renamed GPT-NeoX's `embed_out` to `lm_head`; TL's converter still reads the
    # old name, so hand it a view with both parts under the names it expects.
    view = SimpleNamespace(gpt_neox=hf_model.gpt_neox, embed_out=hf_model.get_output_embeddings())
    return convert_neox_weights(view, cfg)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "GPT2LMHeadModel", gpt2_config, convert_gpt2_weights, ("unembed.b_U",), "if_bos_token"
        ),
        Architecture(
            "LlamaForCausalLM", llama_config, convert_llama_weights, _LLAMA_ABSENT, "as_tokenizer"
        ),
        # Pythia was trained without a BOS token; TransformerLens defaults it off too.
        Architecture("GPTNeoXForCausalLM", neox_config, _convert_neox, ("unembed.b_U",), "never"),
    )
}


def architecture_name(hf_config: Any) -> str:
    """The HF causal-LM class a config describes (GGUF configs name none: map model_type)."""
    names = getattr(hf_config, "architectures", None)
    if names:
        return str(names[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(hf_config, "model_type", None)
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, f"model_type {model_type!r}")


def get_architecture(hf_config: Any) -> Architecture:
    name = architecture_name(hf_config)
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name}; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def hooked_config(
    hf_config: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    default_prepend_bos: bool = True,
    model_name: str | None = None,
) -> HookedTransformerConfig:
    """Build the HookedTransformerConfig for an HF config of a supported architecture."""
    arch = get_architecture(hf_config)
    fields = arch.build_config(hf_config)
    fields.update(
        model_name=model_name or arch.name,
        original_architecture=arch.name,
        tokenizer_name=None,  # never let TransformerLens fetch a tokenizer by name
        # Only metadata for HookedTransformer (it keeps W_U separate); used to count parameters.
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_weights=False,  # every weight is overwritten by the converted state dict
        default_prepend_bos=default_prepend_bos,
        device=str(device),
        dtype=dtype,
    )
    return HookedTransformerConfig(**fields)


def default_prepend_bos(arch: Architecture, tokenizer: Any | None) -> bool:
    """Whether `model.to_tokens` should prepend BOS by default: follow how the model was trained."""
    if tokenizer is None:
        return False
    if arch.prepend_bos == "if_bos_token":
        # GPT-2 style: BOS (<|endoftext|>) separated training documents.
        return tokenizer.bos_token is not None
    if arch.prepend_bos == "as_tokenizer":
        # Llama family: the tokenizer adds BOS iff the model was trained with it (SmolLM2: no).
        return len(tokenizer.encode("")) > 0
    return False


def _activation(name: str, arch: str) -> str:
    if name not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedArchitectureError(f"{arch} with activation {name!r} is not supported")
    return name


def _rope_value(hf: Any, key: str, default: Any) -> Any:
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; older configs at the top level.
    params = getattr(hf, "rope_parameters", None) or {}
    if key in params:
        return params[key]
    value = getattr(hf, key, None)
    return default if value is None else value


def _require_default_rope(hf: Any, arch: str) -> None:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedArchitectureError(f"{arch} with rope_type {rope_type!r} is not supported")
