"""Load a causal LM (hub id, HF folder, GGUF file, alias) as a TransformerLens HookedTransformer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from acgraph.errors import ACGError, ModelLoadError

from .configs import default_prepend_bos, get_architecture, hooked_config
from .spec import ModelSpec, resolve_spec

# Any of these in a model folder means it ships a tokenizer (otherwise tokenizer is None).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def load_model(
    spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load `spec` as an unprocessed HookedTransformer (real LayerNorms, no folding or centering).

    `model.tokenizer` is the model's tokenizer, or None for a local folder that ships none
    (token ids must then be passed directly).
    """
    resolved = resolve_spec(spec)
    hf_model, tokenizer = _load_hf(resolved, dtype)
    # The HF copy is dropped on return: the HookedTransformer holds its own weights.
    return hooked_from_hf(
        hf_model, tokenizer, device=device, dtype=dtype, model_name=_model_name(resolved)
    )


def load_hf_model(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any | None]:
    """The plain transformers model (eval mode, on CPU) and its tokenizer (None if absent)."""
    return _load_hf(resolve_spec(spec), dtype)


def hooked_from_hf(
    hf_model: torch.nn.Module,
    tokenizer: Any | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model_name: str | None = None,
) -> HookedTransformer:
    """Convert an in-memory HF causal LM into a HookedTransformer with the same weights."""
    arch = get_architecture(hf_model.config)
    with _load_errors(f"cannot convert {arch.name} to a HookedTransformer"):
        cfg = hooked_config(
            hf_model.config,
            device=device,
            dtype=dtype or next(hf_model.parameters()).dtype,
            default_prepend_bos=default_prepend_bos(arch, tokenizer),
            model_name=model_name,
        )
        # No tokenizer here: given one, the constructor would re-fetch it by name from the hub.
        model = HookedTransformer(cfg)
        state_dict = _complete_state_dict(model, arch.convert_weights(hf_model, cfg))
        # Unprocessed: keep real LayerNorm/RMSNorm (ln*.hook_scale, ln2.hook_normalized) intact.
        # With every processing step off, TL's load_and_process_state_dict is equivalent to
        # one load_state_dict, which is ~10x faster (TL loads key by key). Every parameter is
        # covered (checked above); buffers (masks, rotary tables) keep their constructed values.
        model.load_state_dict(state_dict, strict=False)
    model.eval()
    attach_tokenizer(model, tokenizer)
    return model


def attach_tokenizer(model: HookedTransformer, tokenizer: Any | None) -> None:
    """What HookedTransformer.set_tokenizer does, minus its reload-by-name of the tokenizer."""
    model.tokenizer = tokenizer
    if tokenizer is None:
        return
    if tokenizer.padding_side is None:
        tokenizer.padding_side = "right"
    # TL adds or strips BOS in to_tokens depending on whether the tokenizer already adds one.
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched to_tokens needs a pad token
    if tokenizer.bos_token is None and tokenizer.eos_token is not None:
        tokenizer.bos_token = tokenizer.eos_token  # TL's convention for prepend_bos


def _load_hf(resolved: ModelSpec, dtype: torch.dtype) -> tuple[torch.nn.Module, Any | None]:
    from transformers import AutoConfig, AutoModelForCausalLM

    where = resolved.describe()
    kwargs: dict[str, Any] = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    with _load_errors(f"cannot read model config from {where}"):
        config = AutoConfig.from_pretrained(resolved.location, **kwargs)
    get_architecture(config)  # refuse unsupported models before reading any weights
    with _load_errors(f"cannot load model weights from {where}"):
        hf_model = AutoModelForCausalLM.from_pretrained(
            resolved.location, config=config, dtype=dtype, **kwargs
        )
    hf_model.eval()
    return hf_model, _load_tokenizer(resolved, kwargs)


def _load_tokenizer(resolved: ModelSpec, kwargs: dict[str, Any]) -> Any | None:
    from transformers import AutoTokenizer

    if resolved.kind == "hf_dir" and not any(
        (Path(resolved.location) / name).is_file() for name in _TOKENIZER_FILES
    ):
        return None
    with _load_errors(f"cannot load tokenizer from {resolved.describe()}"):
        return AutoTokenizer.from_pretrained(resolved.location, **kwargs)


@contextmanager
def _load_errors(context: str) -> Iterator[None]:
    """Turn any failure inside the block into a one-line ModelLoadError (ACGErrors pass through)."""
    try:
        yield
    except ACGError:
        raise
    except Exception as exc:  # transformers/gguf raise many types for unreadable files
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise ModelLoadError(f"{context}: {detail}") from exc


def _complete_state_dict(
    model: HookedTransformer, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Check the converted weights cover the model exactly; zero-fill biases the source lacks.

    TL loads with strict=False and would otherwise keep uninitialized memory for a missing key.
    """
    params = dict(model.named_parameters())
    unexpected = sorted(set(state_dict) - set(params))
    if unexpected:
        raise ModelLoadError(f"weight conversion produced unknown tensors: {unexpected[:5]}")
    for name, param in params.items():
        if name in state_dict:
            continue
        if not name.rsplit(".", 1)[-1].startswith(("b_", "_b_")):
            raise ModelLoadError(f"weight conversion produced no tensor for {name}")
        state_dict[name] = torch.zeros_like(param)
    return state_dict


def _model_name(resolved: ModelSpec) -> str:
    if resolved.alias:
        return resolved.alias
    if resolved.gguf_file:
        return Path(resolved.gguf_file).stem
    return Path(resolved.location).name if resolved.is_local else resolved.location
