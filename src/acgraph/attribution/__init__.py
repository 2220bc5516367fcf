"""Local attribution graphs: exact per-prompt graphs of a transcoder replacement model.

Modules: :mod:`.transcoders` (loading and checking a per-layer set), :mod:`.frozen` (the real
forward pass and the explicit linearized backward), :mod:`.build` (``attribute``),
:mod:`.targets`, :mod:`.graph` (``AttributionGraph``, sparse CSR adjacency, safetensors form),
:mod:`.prune` (influence, pruning, replacement/completeness scores), :mod:`.replacement` (the
frozen model as hooks), :mod:`.attention` (per-head edge split and QK decomposition),
:mod:`.interventions`, :mod:`.export` (Neuronpedia / circuit-tracer graph JSON).
"""

from .build import attribute, tokenize
from .graph import AttributionGraph, Target
from .targets import FeatureSpec, LogitDiffSpec, LogitSpec, salient_logits
from .transcoders import TranscoderSet, load_transcoders

__all__ = [
    "AttributionGraph",
    "FeatureSpec",
    "LogitDiffSpec",
    "LogitSpec",
    "Target",
    "TranscoderSet",
    "attribute",
    "load_transcoders",
    "salient_logits",
    "tokenize",
]
