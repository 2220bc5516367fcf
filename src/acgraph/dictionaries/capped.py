"""Capped transcoder sets: dictionaries whose activations may not exceed a per-feature ceiling
(what trusted data reached), as `acg clean` and `acg distill` write them.

Layout (one folder)::

    transcoders/<hook>/      SAELens-layout folders (formats.py)
    ceilings.safetensors     L{layer}: [d_sae] activation ceiling (optional per layer)
    attention_bounds.safetensors  per-head attention caps (optional; graph/attention_bounds.py)
    clean.json               the report of the job that wrote it

:func:`acgraph.dictionaries.formats.load_transcoder_folder` reads such a folder like any
other transcoder set, so every command that takes ``--transcoders`` accepts it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from acgraph.errors import ArtifactError
from acgraph.io import atomic_save_tensors, load_tensors

SUBFOLDER = "transcoders"
CEILINGS = "ceilings.safetensors"


class CappedActivation(nn.Module):
    """``min(inner(pre), ceiling)`` per feature: an activation may not exceed what trusted data
    reached. Exactly expressible with one extra ReLU unit per feature (safety/compile.py)."""

    def __init__(self, inner: nn.Module, ceiling: Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("ceiling", ceiling.clone())

    def forward(self, pre: Tensor) -> Tensor:
        return torch.minimum(self.inner(pre), self.ceiling.to(pre.dtype))

    def jumprelu_threshold(self) -> Tensor | None:
        fn = getattr(self.inner, "jumprelu_threshold", None)
        return fn() if fn is not None else None


def is_capped_set(folder: Path) -> bool:
    return (folder / SUBFOLDER).is_dir() and not (folder / "config.yaml").is_file()


def _layer(hook_out: str) -> int | None:
    parts = hook_out.split(".")
    ok = len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit()
    return int(parts[1]) if ok else None


def save_ceilings(dicts, folder: Path) -> None:
    """Write every dictionary's ceiling (those with a :class:`CappedActivation`)."""
    caps = {}
    for d in dicts:
        ceiling = getattr(d.activation, "ceiling", None)
        if ceiling is not None:
            caps[f"L{_layer(d.cfg.hook_out)}"] = ceiling
    atomic_save_tensors(folder / CEILINGS, caps)


def apply_ceilings(dicts, folder: Path) -> None:
    """Wrap each dictionary's activation in the ceiling ``folder`` stores for its layer."""
    path = folder / CEILINGS
    caps = load_tensors(path) if path.is_file() else {}
    for d in dicts:
        ceiling = caps.get(f"L{_layer(d.cfg.hook_out)}")
        if ceiling is None:
            continue
        if ceiling.shape != (d.d_sae,):
            raise ArtifactError(f"{folder}: the ceiling of {d.cfg.hook_out} does not match it")
        d.activation = CappedActivation(d.activation, ceiling.to(d.W_enc))
