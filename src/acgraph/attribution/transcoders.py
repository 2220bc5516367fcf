"""A per-layer transcoder set for attribution: one transcoder per MLP, checked against a model.

Sources accepted by :func:`load_transcoders`:
- a list of :class:`~acgraph.dictionaries.SparseDictionary` (one per layer, any order);
- a folder holding a circuit-tracer transcoder set (``config.yaml`` + ``layer_{i}.safetensors``);
- a folder of SAELens-layout folders (``blocks.L.hook_mlp_out/cfg.json`` ...), ours or SAELens's;
- ``"organism"``: the skip transcoders shipped with the organism.

Every layer must have one transcoder reading ``blocks.L.ln2.hook_normalized`` (or
``blocks.L.hook_resid_mid``) and writing ``blocks.L.hook_mlp_out`` with the model's width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from acgraph.dictionaries.dictionary import SparseDictionary
from acgraph.errors import ArtifactError, ConfigError

# Input hooks the linearized backward knows how to differentiate (suffix after blocks.L.).
INPUT_HOOKS = ("ln2.hook_normalized", "hook_resid_mid")
OUTPUT_HOOK = "hook_mlp_out"


@dataclass
class TranscoderSet:
    """Per-layer transcoders in layer order, with the hook suffixes they share."""

    dictionaries: list[SparseDictionary]
    input_hook: str  # suffix, e.g. "ln2.hook_normalized"
    name: str = "transcoders"

    @property
    def n_layers(self) -> int:
        return len(self.dictionaries)

    @property
    def d_sae(self) -> list[int]:
        return [d.d_sae for d in self.dictionaries]

    @property
    def has_skip(self) -> bool:
        return any(d.W_skip is not None for d in self.dictionaries)

    def __getitem__(self, layer: int) -> SparseDictionary:
        return self.dictionaries[layer]

    def encoder_rows(self, layer: int, features: Tensor) -> Tensor:
        """Encoder vectors ``[n, d_in]`` of ``features`` at ``layer``."""
        return self.dictionaries[layer].W_enc.detach()[:, features].T

    def decoder_rows(self, layer: int, features: Tensor) -> Tensor:
        return self.dictionaries[layer].W_dec.detach()[features]

    def skip(self, layer: int) -> Tensor | None:
        w = self.dictionaries[layer].W_skip
        return None if w is None else w.detach()


def _split(hook: str) -> tuple[int, str]:
    parts = hook.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ConfigError(f"transcoder hook {hook!r} is not a per-layer hook (blocks.L.name)")
    return int(parts[1]), parts[2]


def make_set(dictionaries: Sequence[SparseDictionary], model=None, name: str = "") -> TranscoderSet:
    """Order ``dictionaries`` by layer and check them (and against ``model`` when given)."""
    by_layer: dict[int, SparseDictionary] = {}
    inputs: set[str] = set()
    for d in dictionaries:
        if d.cfg.kind not in ("transcoder", "skip_transcoder"):
            raise ArtifactError(f"{d.cfg.name!r} is a {d.cfg.kind}, not a transcoder")
        layer_in, suffix_in = _split(d.cfg.hook_in)
        layer_out, suffix_out = _split(d.cfg.hook_out)
        if suffix_in not in INPUT_HOOKS:
            raise ArtifactError(
                f"{d.cfg.name!r} reads {d.cfg.hook_in}; attribution supports transcoders reading "
                f"{' or '.join('blocks.L.' + h for h in INPUT_HOOKS)}"
            )
        if suffix_out != OUTPUT_HOOK or layer_out != layer_in:
            raise ArtifactError(
                f"{d.cfg.name!r} writes {d.cfg.hook_out}; expected blocks.{layer_in}.{OUTPUT_HOOK}"
            )
        if layer_in in by_layer:
            raise ArtifactError(f"two transcoders for layer {layer_in}")
        by_layer[layer_in] = d
        inputs.add(suffix_in)
    if not by_layer:
        raise ArtifactError("no transcoders given")
    if len(inputs) != 1:
        raise ArtifactError(f"transcoders read different hooks: {sorted(inputs)}")
    n_layers = max(by_layer) + 1 if model is None else model.cfg.n_layers
    missing = [i for i in range(n_layers) if i not in by_layer]
    if missing or max(by_layer) >= n_layers:
        raise ArtifactError(
            f"need one transcoder per layer 0..{n_layers - 1}; have layers {sorted(by_layer)}"
        )
    ts = TranscoderSet([by_layer[i] for i in range(n_layers)], inputs.pop(), name or "transcoders")
    if model is not None:
        check_against_model(ts, model)
    return ts


def check_against_model(ts: TranscoderSet, model) -> None:
    d_model = model.cfg.d_model
    if ts.n_layers != model.cfg.n_layers:
        raise ArtifactError(
            f"{ts.n_layers} transcoders for a model with {model.cfg.n_layers} layers"
        )
    for i, d in enumerate(ts.dictionaries):
        if d.d_in != d_model or d.d_out != d_model:
            raise ArtifactError(
                f"layer {i} transcoder has d_in={d.d_in}, d_out={d.d_out}; the model has "
                f"d_model={d_model}"
            )
    if ts.input_hook == "ln2.hook_normalized" and model.cfg.normalization_type not in (
        "LN",
        "RMS",
    ):
        raise ArtifactError(
            "transcoders read ln2.hook_normalized, but the model's norms are folded "
            f"({model.cfg.normalization_type}); load the model unprocessed"
        )


def load_transcoders(source, model=None) -> TranscoderSet:
    """A :class:`TranscoderSet` from a list of dictionaries, a folder, or ``"organism"``."""
    from acgraph.dictionaries.formats import load_transcoder_folder

    if isinstance(source, TranscoderSet):
        if model is not None:
            check_against_model(source, model)
        return source
    if isinstance(source, (list, tuple)):
        return make_set(source, model)
    dicts = load_transcoder_folder(source)
    name = "organism" if str(source) == "organism" else Path(source).name
    return make_set(dicts, model, name=name)


def to_device(ts: TranscoderSet, device: torch.device | str) -> TranscoderSet:
    return TranscoderSet([d.to(device) for d in ts.dictionaries], ts.input_hook, ts.name)
