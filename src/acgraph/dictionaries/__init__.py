"""Sparse dictionaries: SAEs, transcoders and skip transcoders (cross-layer transcoders later).

Modules: :mod:`.config` (DictionaryConfig), :mod:`.activations` (TopK, BatchTopK, JumpReLU,
ReLU), :mod:`.dictionary` (SparseDictionary), :mod:`.activation_stream` (deterministic shuffle
buffer, activation shards), :mod:`.training` (train_dictionaries, checkpoints, resume),
:mod:`.metrics` (FVU, L0, dead/dense, splicing CE/KL), :mod:`.formats` (SAELens layout,
circuit-tracer transcoder sets).
"""

from .activation_stream import ActivationStream, StreamPosition, capture_hooks, special_token_ids
from .activations import Activation, BatchTopK, JumpReLU, ReLU, TopK, make_activation
from .config import ACTIVATIONS, KINDS, DictionaryConfig
from .dictionary import SparseDictionary
from .formats import (
    check_compatible,
    export_circuit_tracer,
    from_hub,
    hook_widths,
    load_circuit_tracer,
    load_dictionary,
    save_dictionary,
)
from .metrics import (
    FVUAccumulator,
    SparsityAccumulator,
    ce_loss_recovered,
    evaluate_dictionaries,
    fvu,
)
from .training import TrainConfig, TrainResult, latest_checkpoint, train_dictionaries

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "Activation",
    "ActivationStream",
    "BatchTopK",
    "DictionaryConfig",
    "FVUAccumulator",
    "JumpReLU",
    "ReLU",
    "SparseDictionary",
    "SparsityAccumulator",
    "StreamPosition",
    "TopK",
    "TrainConfig",
    "TrainResult",
    "capture_hooks",
    "ce_loss_recovered",
    "check_compatible",
    "evaluate_dictionaries",
    "export_circuit_tracer",
    "from_hub",
    "fvu",
    "hook_widths",
    "latest_checkpoint",
    "load_circuit_tracer",
    "load_dictionary",
    "make_activation",
    "save_dictionary",
    "special_token_ids",
    "train_dictionaries",
]
