"""Keep only the features a task needs, then compile (`acg distill`).

A task is a corpus (for the organism: one domain's text). Each feature is scored by its
attribution to the task's next tokens: ``|a_i · ∂ log p(next) / ∂a_i|`` summed over the task's
positions, through the model with every MLP replaced by its transcoder (attention and norms
live). Under a budget (a fraction of the features) the best-scoring features of each layer
are kept; the rest are removed as in a cleaned graph, and the result compiles like any other
level-1 ACG. Heads and edges are not selected yet (only features).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ConfigError

from .compile import derive_transcoder


def feature_attribution(
    model: Any, transcoders: dict[int, Any], batches: Sequence[Tensor]
) -> dict[int, Tensor]:
    """Per layer ``[d_sae]``: summed ``|activation x gradient|`` of the log-probability of every
    next token of ``batches`` (BOS and pad positions excluded)."""
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    scores = {i: torch.zeros(tc.d_sae) for i, tc in transcoders.items()}
    model.requires_grad_(False)
    for tokens in batches:
        keep = torch.ones_like(tokens, dtype=torch.bool)
        keep[:, 0] = False
        if pad is not None:
            keep &= tokens != pad
        acts: dict[int, Tensor] = {}
        hooks = _attribution_hooks(transcoders, keep, acts)
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        target = keep[:, 1:]
        logp[target].sum().backward()
        for layer, a in acts.items():
            scores[layer] += (a * a.grad).abs().detach().sum((0, 1))
    return scores


def _attribution_hooks(
    transcoders: dict[int, Any], keep: Tensor, acts: dict[int, Tensor]
) -> list[tuple[str, Any]]:
    """Splice hooks whose feature activations are leaves (their gradients are the scores)."""
    inputs: dict[int, Tensor] = {}
    hooks: list[tuple[str, Any]] = []
    for layer, tc in transcoders.items():

        def store(value: Tensor, hook: Any, layer: int = layer) -> None:
            inputs[layer] = value

        def replace(value: Tensor, hook: Any, layer: int = layer, tc: Any = tc) -> Tensor:
            x = inputs.pop(layer)
            a = tc.activation(tc.pre_acts(x).detach()).detach().requires_grad_(True)
            acts[layer] = a
            return torch.where(keep[..., None], tc.decode(a, x), value)

        hooks += [(f"blocks.{layer}.ln2.hook_normalized", store)]
        hooks += [(f"blocks.{layer}.hook_mlp_out", replace)]
    return hooks


def select_features(scores: dict[int, Tensor], budget: float) -> dict[int, Tensor]:
    """Keep masks: the top ``budget`` fraction of each layer's features by score."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"budget must be in (0, 1], got {budget}")
    keep = {}
    for layer, s in scores.items():
        n = max(1, round(budget * len(s)))
        mask = torch.zeros(len(s), dtype=torch.bool)
        mask[s.topk(n).indices] = True
        keep[layer] = mask
    return keep


def distill(
    model: Any, transcoders: dict[int, Any], task: Sequence[Tensor], budget: float
) -> tuple[Any, dict[int, Any], dict[int, Tensor]]:
    """(ACGModel, kept transcoders, keep masks) of the features ``task`` needs most."""
    from acgraph.graph.forward import ACGModel
    from acgraph.graph.weights import ModelWeights

    keep = select_features(feature_attribution(model, transcoders, task), budget)
    kept = {i: derive_transcoder(tc, keep=keep[i]) for i, tc in transcoders.items()}
    for i, tc in kept.items():  # an activation cap travels with the features it caps
        cap = getattr(transcoders[i].activation, "ceiling", None)
        if cap is not None:
            from .clean import CappedActivation

            tc.activation = CappedActivation(tc.activation, cap[keep[i]])
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    return ACGModel(ModelWeights(model, kept, bos)), kept, keep
