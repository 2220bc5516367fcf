"""Fitted formulas: refit each feature's k kept in-edges by least squares (level 2 "fit").

Mean folding keeps a pruned feature's average input, but the dropped edges' variation is lost,
and much of it is correlated with edges that were kept. Here the kept edges' weights and the
bias are refit (ridge least squares, float64) to predict the feature's level-1 pre-activation
from the kept edges' contributions ``G/s`` on the statistics corpus. Layers are fitted in order,
each on inputs from the already-fitted graph below it, so a layer learns to work with the
features the pruned graph will actually give it. The result is still "Z = 3·A + 4·B" over the
same parents; only the coefficients are effective rather than virtual weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .forward import ACGModel, LayerEdges
from .prune import RankedEdges, select_edges
from .weights import ModelWeights


def _kept(ranked: RankedEdges, k: int) -> tuple[Tensor, Tensor]:
    """(channel number, slot) of each feature's top-k edges, both [n_features, k]."""
    offsets = torch.tensor(ranked.offsets + [10**18])
    idx = ranked.index[:, :k].contiguous()
    chan = torch.bucketize(idx, offsets, right=True) - 1
    return chan, idx - offsets[chan]


@torch.no_grad()
def _normal_equations(
    truth: ACGModel, below: ACGModel, ranked: RankedEdges, layer: int, k: int, batches, pad
) -> tuple[Tensor, Tensor]:
    chan, slot = _kept(ranked, k)
    n_feat = chan.shape[0]
    xtx = torch.zeros(n_feat, k + 1, k + 1, dtype=torch.float64)
    xty = torch.zeros(n_feat, k + 1, dtype=torch.float64)
    for tokens in batches:
        trace = below.run(tokens)
        target = truth.run(tokens).pre[layer] if below is not truth else trace.pre[layer]
        mask = torch.ones_like(trace.tokens, dtype=torch.bool)
        mask[:, 0] = False
        if pad is not None:
            mask &= trace.tokens != pad
        s = trace.s2[layer][mask]
        cols = torch.zeros(int(mask.sum()), n_feat, k + 1)
        cols[..., k] = 1.0  # the intercept
        for c in chan.unique().tolist():
            sel = chan == c
            slots = torch.unique(slot[sel])
            g = below.gated(trace, ranked.channels[c], slots)[mask] / s[:, None]
            f_i, k_i = sel.nonzero(as_tuple=True)
            cols[:, f_i, k_i] = g[:, torch.searchsorted(slots, slot[sel])]
        x = cols.double().transpose(0, 1)  # [n_feat, N, k + 1]
        xtx += x.transpose(1, 2) @ x
        xty += (x.transpose(1, 2) @ target[mask].double().T[..., None])[..., 0]
    return xtx, xty


def _solve(xtx: Tensor, xty: Tensor, ridge: float) -> Tensor:
    """Ridge solution; the penalty is relative to each system's mean diagonal, none on the
    intercept, so scale differences between features do not matter."""
    k1 = xtx.shape[-1]
    penalty = torch.eye(k1, dtype=xtx.dtype)
    penalty[-1, -1] = 0
    scale = xtx.diagonal(dim1=1, dim2=2)[:, :-1].mean(1).clamp(min=1e-12)
    return torch.linalg.solve(xtx + ridge * scale[:, None, None] * penalty, xty)


@torch.no_grad()
def fit_edges(
    weights: ModelWeights,
    ranked: dict[int, RankedEdges],
    batches: Sequence[Tensor],
    k: int,
    *,
    ridge: float = 1e-3,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Fitted (weights [n_features, k], bias [n_features]) per layer for the top-k edges."""
    truth = ACGModel(weights)
    fitted: dict[int, tuple[Tensor, Tensor]] = {}
    edges: dict[int, LayerEdges] = {}
    layers = range(weights.layout.n_layers)
    for layer in tqdm(layers, desc=f"acg: fit k={k}", disable=None if progress else True):
        below = ACGModel(weights, dict(edges)) if edges else truth
        xtx, xty = _normal_equations(truth, below, ranked[layer], layer, k, batches, pad_token_id)
        beta = _solve(xtx, xty, ridge).float()
        fitted[layer] = (beta[:, :k].contiguous(), beta[:, k].contiguous())
        edges[layer] = fitted_layer_edges(weights, ranked[layer], layer, *fitted[layer])
    return fitted


def fitted_layer_edges(
    weights: ModelWeights, ranked: RankedEdges, layer: int, weight: Tensor, bias: Tensor
) -> LayerEdges:
    """The kept edges of ``ranked`` (top ``weight.shape[1]``) with fitted weights and bias."""
    k = weight.shape[1]
    swapped = RankedEdges(
        ranked.channels,
        ranked.offsets,
        ranked.index[:, :k],
        weight,
        torch.zeros_like(weight),
        ranked.importance[:, :k],
        torch.zeros_like(bias),
    )
    edges = select_edges(weights, swapped, layer, k)
    edges.bias = bias
    return edges
