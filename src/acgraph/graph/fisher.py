"""How much an error in each feature costs the output: the diagonal of the Fisher information.

Adaptive fan-in (refit.py) spends a layer's edge budget where it removes the most error, so
it needs each feature's price per unit of squared error. For the KL between the graph's output
and the model's, that price is, to second order, the Fisher information ``E_y~p[(∂ log
p(y)/∂a_i)²]``: how much a change in the feature moves the log-probabilities, weighted by how
likely each output is. One label per position, sampled from the output, gives an unbiased
estimate; summed over the corpus it is stable.

The gradient is the total one (through every later feature and head), taken where the feature
fires: an error in the pre-activation of a feature that does not fire is cut by the
activation. Decoder norms, the alternative, see only how far the feature moves the residual
stream, not whether the output reads that direction: on the organism the last layer's
answer-digit features write little to the residual stream but decide the answer.

The same sampled gradients, taken at every head's attention scores, price level 3's
query-key pairs (stats.py): what an error in the score of (query t, key u) does to the output
scales with ``|∂ log p(y)/∂score(t, u)|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.progress import progress_bar

from .forward import ACGModel, Replacement, Trace


class _Probe(Replacement):
    """Adds a zero leaf to every layer's activations and attention scores, so their gradients
    are the total derivatives of the output with respect to those nodes."""

    def __init__(self) -> None:
        self.acts_leaves: list[Tensor] = []
        self.score_leaves: list[Tensor] = []

    def scores(self, layer: int, scores: Tensor, trace: Trace) -> Tensor:
        leaf = torch.zeros_like(scores, requires_grad=True)
        self.score_leaves.append(leaf)
        return scores + leaf

    def acts(self, layer: int, acts: Tensor, trace: Trace) -> Tensor:
        leaf = torch.zeros_like(acts, requires_grad=True)
        self.acts_leaves.append(leaf)
        return acts + leaf


@dataclass
class SampledGradients:
    """One batch's run and the gradients of ``Σ log p(y)`` over its valid positions, every
    ``y`` sampled from the graph's own output there."""

    trace: Trace
    mask: Tensor  # [B, T] bool: positions after the BOS that are not padding
    acts: list[Tensor]  # per layer [B, T, n_features]
    scores: list[Tensor]  # per layer [B, H, T, T] (0 on masked-out keys)


def sampled_gradients(
    model: ACGModel, tokens: Tensor, gen: torch.Generator, pad_token_id: int | None = None
) -> SampledGradients:
    probe = _Probe()
    with torch.enable_grad():  # callers fit under no_grad
        trace = model.run(tokens, replace=probe, grad=True)
        logp = F.log_softmax(trace.logits.double(), -1)
        mask = valid_positions(trace.tokens, pad_token_id)
        labels = torch.multinomial(logp.detach().exp().flatten(0, 1), 1, generator=gen)
        picked = logp.gather(-1, labels.view(*mask.shape, 1))[..., 0]
        grads = torch.autograd.grad(picked[mask].sum(), probe.acts_leaves + probe.score_leaves)
    n = len(probe.acts_leaves)
    return SampledGradients(trace, mask, list(grads[:n]), list(grads[n:]))


def fisher_importance(
    model: ACGModel,
    batches: Sequence[Tensor],
    pad_token_id: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[int, Tensor]:
    """Per layer [n_features] (float64): the sum over positions where feature i fires of
    ``(∂ log p(y)/∂a_i)²``, y sampled from the graph's output at that position, divided by
    the number of positions."""
    gen = torch.Generator().manual_seed(seed)
    total: dict[int, Tensor] = {}
    n = 0
    for tokens in progress_bar(batches, desc="acg: Fisher prices", enabled=progress):
        got = sampled_gradients(model, tokens, gen, pad_token_id)
        for layer, (g, acts) in enumerate(zip(got.acts, got.trace.acts, strict=True)):
            fires = (acts.detach() != 0) & got.mask[..., None]
            total[layer] = total.get(layer, 0) + (g.double().pow(2) * fires).sum((0, 1))
        n += int(got.mask.sum())
    return {layer: t / max(n, 1) for layer, t in total.items()}
