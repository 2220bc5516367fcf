"""Choose each feature's in-edges (top-k by mean |contribution|) and fold the rest into its bias.

A target's dropped edges are replaced by their mean contribution over the statistics corpus
(mean ablation, ACG.md §3), so ``k = all`` is exactly the level-1 graph and every smaller ``k``
keeps the target's average input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.errors import ConfigError

from .forward import KEY_CHUNK, ChannelEdges, LayerEdges, QKPairs, RotaryPairs
from .layout import Channel
from .stats import EdgeStats
from .weights import ModelWeights

#: above this many dense entries a channel's kept weights are stored as sparse CSR (CPU
#: sparse matmuls only pay off when the dense form would not fit)
_DENSE_LIMIT = 20_000_000


@dataclass
class RankedEdges:
    """The ``K`` most important in-edges of every feature of one layer, best first."""

    channels: list[Channel]
    offsets: list[int]  # start of each channel's slots in the candidate index
    index: Tensor  # [n_features, K] candidate index (channel offset + slot)
    weight: Tensor  # [n_features, K] virtual weight
    mean: Tensor  # [n_features, K] mean contribution w · E[G/s]
    importance: Tensor  # [n_features, K] the ranking score (see rank_edges)
    total_mean: Tensor  # [n_features] mean contribution summed over every candidate

    @property
    def max_k(self) -> int:
        return self.index.shape[1]

    def channel_of(self, index: int) -> tuple[int, int]:
        """(channel number, slot) of a candidate index."""
        for c in range(len(self.offsets) - 1, -1, -1):
            if index >= self.offsets[c]:
                return c, index - self.offsets[c]
        raise IndexError(index)


RANKINGS = ("std", "mean_abs")
#: margin on the skip bound of rank_edges, far above float32 rounding
_BOUND_SLACK = 1.01


@torch.no_grad()
def rank_edges(
    weights: ModelWeights, stats: EdgeStats, layer: int, max_k: int, ranking: str = "std"
) -> RankedEdges:
    """Rank every (channel, source) in-edge of ``layer``'s features.

    ``std`` (default) ranks by |w|·std(G/s), the error of replacing the edge by its mean, which
    is what pruning does; ``mean_abs`` ranks by mean |w·G/s| (ACG.md §3), which also favours
    large, nearly constant inputs that the folded mean already captures.
    """
    if ranking not in RANKINGS:
        raise ConfigError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    channels = weights.layout.channels(layer)
    # Sources never active on the statistics corpus (most of a large vocabulary) have zero
    # score and zero mean contribution: their weights are not even formed, unless too few
    # sources were seen to fill max_k.
    seen = [(stats.mean_abs[(layer, c)] > 0).nonzero()[:, 0] for c in range(len(channels))]
    if sum(len(r) for r in seen) < max_k:
        seen = [torch.arange(weights.layout.channel_size(ch)) for ch in channels]
    # Scoring every candidate costs channels × sources × features, the cube of the depth. Two
    # things keep it down: a source whose bound |w| <= |values_j|·|read_f| cannot beat any
    # feature's k-th best so far is never scored (exact: the ranking is unchanged; on SmolLM2
    # the k-th bests are nearly equal across features, and 97% of sources fall out), and the
    # scores are laid out [features, sources] (top-k along contiguous rows), each read
    # site's source vectors formed once for all the channels reading it.
    best: list[Tensor] | None = None  # importance, index, weight, mean: [n_features, <= max_k]
    total = None
    offsets, offset = [], 0
    sources = site = None
    for c, channel in enumerate(channels):
        if channel.read_site != site:
            site, sources = channel.read_site, weights.source_vectors(channel.read_site)
        rows = seen[c]
        values, read = weights.channel_factors(channel, layer, rows, sources)
        spread = stats.std((layer, c)) if ranking == "std" else stats.mean_abs[(layer, c)]
        spread = spread[rows].to(values)
        mean = stats.mean[(layer, c)][rows].to(values)
        part = read.T @ (values.T @ mean)  # every source's mean contribution, unscored too
        total = part if total is None else total + part
        offsets.append(offset)
        offset += weights.layout.channel_size(channel)
        if best is not None and best[0].shape[1] == max_k:
            reach = values.norm(dim=1) * spread * (read.norm(dim=0) / best[0][:, -1]).max()
            keep = reach * _BOUND_SLACK > 1  # slack: the bound is rounded like the scores
            if not bool(keep.any()):
                continue
            rows, values, spread, mean = rows[keep], values[keep], spread[keep], mean[keep]
        W = read.T @ values.T  # [n_features, n_rows]
        imp = W.abs().mul_(spread)
        imp_top, top = imp.topk(min(max_k, W.shape[1]), dim=1)
        w_top = W.gather(1, top)
        found = [imp_top, rows.to(top)[top] + offsets[-1], w_top, w_top * mean[top]]
        if best is not None:
            found = [torch.cat([b, f], 1) for b, f in zip(best, found, strict=True)]
            keep_top = found[0].topk(min(max_k, found[0].shape[1]), dim=1).indices
            found = [f.gather(1, keep_top) for f in found]
        best = found
    order = best[0].argsort(1, descending=True)
    imp, index, weight, mean = (b.gather(1, order).contiguous() for b in best)
    return RankedEdges(
        channels=channels,
        offsets=offsets,
        index=index,
        weight=weight,
        mean=mean,
        importance=imp,
        total_mean=total,
    )


def _csr(indices: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" and the like
        warnings.simplefilter("ignore")
        return torch.sparse_coo_tensor(indices, values, size).coalesce().to_sparse_csr()


def _channel_edges(channel: Channel, slots: Tensor, targets: Tensor, w: Tensor, n_feat: int):
    """One channel's kept edges as (used slots, weight [n_features, n_used])."""
    used, local = torch.unique(slots, return_inverse=True)
    if used.numel() * n_feat <= _DENSE_LIMIT:
        dense = torch.zeros(n_feat, used.numel(), dtype=w.dtype, device=w.device)
        dense.index_put_((targets, local), w, accumulate=True)
        return ChannelEdges(channel, used, dense)
    weight = _csr(torch.stack([targets, local]), w, (n_feat, used.numel()))
    return ChannelEdges(channel, used, weight)


def select_edges(weights: ModelWeights, ranked: RankedEdges, layer: int, k: int) -> LayerEdges:
    """Each feature keeps its top ``k`` ranked edges; the others' mean goes into its bias."""
    k = min(k, ranked.max_k)
    n_feat = ranked.index.shape[0]
    idx, w = ranked.index[:, :k], ranked.weight[:, :k]
    fold = ranked.total_mean - ranked.mean[:, :k].sum(1)
    targets = torch.arange(n_feat, device=idx.device)[:, None].expand_as(idx)
    offsets = torch.tensor(ranked.offsets + [10**18], device=idx.device)
    chan = torch.bucketize(idx.contiguous(), offsets, right=True) - 1
    out = []
    for c, channel in enumerate(ranked.channels):
        sel = chan == c
        if not bool(sel.any()):
            continue
        slots = idx[sel] - ranked.offsets[c]
        out.append(_channel_edges(channel, slots, targets[sel], w[sel], n_feat))
    return LayerEdges(out, weights.target_bias(layer) + fold)


def full_edges(weights: ModelWeights, layer: int) -> LayerEdges:
    """Every edge of ``layer`` (level 1 written as edges; the exactness test runs this)."""
    out = []
    for channel in weights.layout.channels(layer):
        W = weights.channel_weights(channel, layer, features_first=True)
        out.append(ChannelEdges(channel, torch.arange(W.shape[1]), W))
    return LayerEdges(out, weights.target_bias(layer))


# ---------------------------------------------------------------------- QK pairs


@dataclass
class RankedPairs:
    """The ``P`` most important query-key source pairs of one head, best first."""

    q: Tensor  # [P] query-side slots
    k: Tensor  # [P] key-side slots
    weight: Tensor  # [P]
    importance: Tensor  # [P]
    query_vec: Tensor  # [d_head]: query bias + mean query (every pair at its query mean)
    mean_q: Tensor  # [n_sources] E[ã_j] on query positions


@torch.no_grad()
def rank_pairs(weights: ModelWeights, stats: EdgeStats, layer: int, head: int, max_pairs: int):
    """Rank query-key source pairs (among the statistics' candidates) by what dropping the pair
    loses (stats.py): with gradient-weighted statistics ``|W_jm|^p Σ |g_h(t, u) (ã_j(t) − μ_j)
    (ã_m(u) − μ_m)|^p`` (p = 1: its effect on log p(y); p = 2: its cost in KL); otherwise
    mean |(ã_j(t) − μ_j) W_jm (ã_m(u) − μ_m)| over causal (t, u). Rotary models: |W_jm| is the
    largest the pair weight gets at any offset (:func:`rotary_bound`); ``weight`` holds its
    value at offset 0."""
    q, k, q_bias = weights.qk_vectors(layer, head)
    cq, ck = stats.pair_q[layer], stats.pair_k[layer]
    W = q[cq] @ k[ck].T  # [n_q candidates, n_k candidates]
    size = rotary_bound(weights, q[cq], k[ck]) if weights.rotary else W.abs()
    if stats.pair_power:
        imp = size.pow(stats.pair_power) * stats.pair_grad[layer][head].to(W)
    else:
        imp = size * stats.pair_abs[layer].to(W)
    top = imp.flatten().topk(min(max_pairs, imp.numel()))
    n = W.shape[1]
    mean_q = stats.query_mean[layer].to(W)
    return RankedPairs(
        q=cq[top.indices // n],
        k=ck[top.indices % n],
        weight=W.flatten()[top.indices],
        importance=top.values,
        query_vec=q_bias + mean_q @ q,
        mean_q=mean_q,
    )


def rotary_bound(weights: ModelWeights, q: Tensor, k: Tensor) -> Tensor:
    """``max over offsets δ of |q_j·R(δ) k_m|`` bounded by plane: a rotation keeps each rotated
    plane's norm, so the bound is Σ_planes |q_j,f| |k_m,f| + |q_j·k_m| over unrotated dims."""
    cfg = weights.cfg
    r = cfg.rotary_dim
    planes = []
    for v in (q, k):
        rot = v[:, :r]
        if cfg.rotary_adjacent_pairs:
            pairs = rot.reshape(len(v), r // 2, 2)
        else:
            pairs = torch.stack([rot[:, : r // 2], rot[:, r // 2 :]], -1)
        planes.append(pairs.norm(dim=-1))
    return planes[0] @ planes[1].T + (q[:, r:] @ k[:, r:].T).abs()


def select_pairs(
    ranked: RankedPairs,
    n_pairs: int,
    weights: ModelWeights | None = None,
    layer: int | None = None,
    head: int | None = None,
) -> QKPairs:
    """Keep the top ``n_pairs``. Dropped pairs see their query side at its mean: the score is
    ``kept pairs + k(u)·query_vec − (kept pairs at their query mean)``, where ``k(u)`` is the
    key of the whole graph residual (linear in the key-side nodes). Rotary models need
    ``weights``, ``layer`` and ``head``: their pairs run as vectors (:class:`RotaryPairs`)."""
    q, k, w = ranked.q[:n_pairs], ranked.k[:n_pairs], ranked.weight[:n_pairs]
    q_used, q_local = torch.unique(q, return_inverse=True)
    k_used, k_local = torch.unique(k, return_inverse=True)
    rotary = None
    if weights is not None and weights.rotary:
        rotary = _rotary_pairs(ranked, weights, layer, head, q_used, q_local, k_used, k_local)
    if q_used.numel() * k_used.numel() <= _DENSE_LIMIT:
        weight = torch.zeros(q_used.numel(), k_used.numel(), dtype=w.dtype)
        weight.index_put_((q_local, k_local), w, accumulate=True)
    else:
        weight = _csr(torch.stack([k_local, q_local]), w, (k_used.numel(), q_used.numel()))
    corr = torch.zeros(k_used.numel(), dtype=w.dtype)
    corr.index_add_(0, k_local, ranked.mean_q[q] * w)
    return QKPairs(q_used, k_used, weight, ranked.query_vec, -corr, rotary)


def _rotary_pairs(ranked, weights, layer, head, q_used, q_local, k_used, k_local) -> RotaryPairs:
    if layer is None or head is None:
        raise ConfigError("rotary QK pairs need the layer and head they belong to")
    q_all, k_all, _ = weights.qk_vectors(layer, head)
    kept = []
    for m0 in range(0, len(k_used), KEY_CHUNK):
        sel = (k_local >= m0) & (k_local < m0 + KEY_CHUNK)
        rows = min(KEY_CHUNK, len(k_used) - m0)
        index = torch.stack([k_local[sel] - m0, q_local[sel]])
        kept.append(_csr(index, torch.ones(len(index[0]), dtype=q_all.dtype), (rows, len(q_used))))
    return RotaryPairs(
        kept=kept,
        q_vecs=q_all[q_used],
        k_vecs=k_all[k_used],
        q_mean=ranked.mean_q[q_used],
        mean_query=ranked.mean_q @ q_all,
        key_bias=weights.key_bias(layer, head),
    )
