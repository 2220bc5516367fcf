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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .forward import ACGModel, Replacement, Trace


class _Probe(Replacement):
    """Adds a zero leaf to every layer's activations, so its gradient is the total
    derivative of the output with respect to that layer's features."""

    def __init__(self) -> None:
        self.leaves: list[Tensor] = []

    def acts(self, layer: int, acts: Tensor, trace: Trace) -> Tensor:
        leaf = torch.zeros_like(acts, requires_grad=True)
        self.leaves.append(leaf)
        return acts + leaf


def fisher_importance(
    model: ACGModel, batches: Sequence[Tensor], pad_token_id: int | None = None, seed: int = 0
) -> dict[int, Tensor]:
    """Per layer [n_features] (float64): the sum over positions where feature i fires of
    ``(∂ log p(y)/∂a_i)²``, y sampled from the graph's output at that position, divided by
    the number of positions."""
    gen = torch.Generator().manual_seed(seed)
    total: dict[int, Tensor] = {}
    n = 0
    for tokens in batches:
        probe = _Probe()
        with torch.enable_grad():  # callers fit under no_grad
            trace = model.run(tokens, replace=probe, grad=True)
            logp = F.log_softmax(trace.logits.double(), -1)
            mask = torch.ones_like(trace.tokens, dtype=torch.bool)
            mask[:, 0] = False
            if pad_token_id is not None:
                mask &= trace.tokens != pad_token_id
            labels = torch.multinomial(logp.detach().exp().flatten(0, 1), 1, generator=gen)
            picked = logp.gather(-1, labels.view(*mask.shape, 1))[..., 0]
            grads = torch.autograd.grad(picked[mask].sum(), probe.leaves)
        for layer, (g, acts) in enumerate(zip(grads, trace.acts, strict=True)):
            fires = (acts.detach() != 0) & mask[..., None]
            total[layer] = total.get(layer, 0) + (g.double().pow(2) * fires).sum((0, 1))
        n += int(mask.sum())
    return {layer: t / max(n, 1) for layer, t in total.items()}
