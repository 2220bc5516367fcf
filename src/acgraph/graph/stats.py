"""Data statistics of the ACG's edges over a corpus (ACG.md §3).

The contribution of edge (source j, channel c) to a feature of layer l at position t is
``w · G_c(t, j) / s_l(t)``, with ``w`` constant. So mean(w·a) and mean|w·a| of every edge follow
from two statistics per (target layer, channel, source): E[G/s] and E[|G|/s], over positions
after the BOS that are not padding. For level 3 the same goes for query-key pairs: E over causal
(t, u) of |ã_j(t) − μ_j| |ã_m(u) − μ_m|, with ã = a/s at the head's site and μ its mean over
query positions. Centred, because that is what dropping a pair loses: its query side stays at
μ_j (prune.select_pairs), and a key-side term equal for every key cancels in the softmax.
The means come first, so the pair statistics take a second pass; where a site has more
sources than ``pair_candidates`` (a real vocabulary), they cover only the candidates of each
side (largest E|ã| times the largest query or key norm over heads).

The default prices a pair by what dropping it does to the output instead, from the gradient
``g_h(t, u) = ∂ log p(y)/∂score_h(t, u)`` with labels y sampled from the graph's own output
(fisher.py): per head, Σ over (t, u) of ``|g_h(t, u)|^p |ã_j(t) − μ_j|^p |ã_m(u) − μ_m|^p``,
which times ``|W_jm|^p`` is the pair's first-order effect on log p(y) in magnitude
(``pair_importance="attribution"``, p = 1) or its second-order cost in KL ("fisher", p = 2).
The unweighted statistic ("abs") treats a score error the same wherever it falls; but most
(t, u) score errors change nothing (the query's attention is saturated elsewhere, or the
head's output is not read), and a few decide the answer. On the organism (docs/graph.md)
attribution beats abs in KL at 4k, 16k and 64k pairs per head; fisher, dominated by a few
large gradients, does not. Both cost ``n_heads · n_q · n_k`` floats per layer and one
backward pass per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.errors import ConfigError
from acgraph.progress import progress_bar

from .fisher import sampled_gradients
from .forward import ACGModel

PAIR_IMPORTANCE = ("attribution", "fisher", "abs")
_PAIR_POWER = {"attribution": 1, "fisher": 2}  # the rest: unweighted ("abs")


@dataclass
class EdgeStats:
    mean: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    mean_abs: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    mean_sq: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    pair_abs: dict[int, Tensor] = field(default_factory=dict)  # [n_q candidates, n_k candidates]
    pair_grad: dict[int, Tensor] = field(default_factory=dict)  # [n_heads, n_q, n_k]
    pair_power: int = 0  # p of the gradient-weighted pair statistics (0: pair_abs instead)
    pair_q: dict[int, Tensor] = field(default_factory=dict)  # query-side candidate slots
    pair_k: dict[int, Tensor] = field(default_factory=dict)  # key-side candidate slots
    query_mean: dict[int, Tensor] = field(default_factory=dict)
    n_positions: int = 0
    n_pairs: int = 0

    def std(self, key: tuple[int, int]) -> Tensor:
        """Standard deviation of G/s: what an edge adds beyond its (folded) mean."""
        return (self.mean_sq[key] - self.mean[key].pow(2)).clamp(min=0).sqrt()

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for (layer, c), t in self.mean.items():
            out[f"mean.{layer}.{c}"] = t
            out[f"mean_abs.{layer}.{c}"] = self.mean_abs[(layer, c)]
            out[f"mean_sq.{layer}.{c}"] = self.mean_sq[(layer, c)]
        return out  # the n_sources² pair statistics are for ranking only, never stored

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], n_positions: int, n_pairs: int):
        stats = cls(n_positions=n_positions, n_pairs=n_pairs)
        for key, t in tensors.items():
            kind, *rest = key.split(".")
            if kind in ("mean", "mean_abs", "mean_sq"):
                getattr(stats, kind)[(int(rest[0]), int(rest[1]))] = t
            elif kind in ("pair_abs", "query_mean"):
                getattr(stats, kind)[int(rest[0])] = t
        return stats


def _accumulate(store: dict, key, value: Tensor) -> None:
    store[key] = value if key not in store else store[key] + value


def _readers(layout) -> dict:
    """Each channel and the (target layer, channel number) pairs that read through it: a
    head's or skip's gated activations are computed once per batch for every later layer."""
    out: dict = {}
    for layer in range(layout.n_layers):
        for c, channel in enumerate(layout.channels(layer)):
            out.setdefault(channel, []).append((layer, c))
    return out


def _batch_slots(layout, site: int, tokens: Tensor) -> Tensor:
    """The slots at ``site`` that can be nonzero in this batch: the tokens it holds (a
    vocabulary is mostly absent) and every other source, bias slot included."""
    space = layout.space(site)
    tok = space.slice("tok")
    return torch.cat([tokens.unique(), torch.arange(tok.stop, space.size + 1)])


def _centred(acg: ACGModel, trace, layer: int, slots: Tensor, mean: Tensor) -> Tensor:
    """``[B, T, len(slots)]``: ã − μ of those sources at ``layer``'s head site, ã = a/s1."""
    site = acg.layout.head_site(layer)
    return acg.source_columns(trace, site, slots) / trace.s1[layer][..., None] - mean[slots]


def _pair_sums(
    acg: ACGModel, trace, layer: int, mask: Tensor, q: Tensor, k: Tensor, mean: Tensor
) -> Tensor:
    """Σ over causal (t, u), t valid, of |ã_j(t) − μ_j| |ã_m(u) − μ_m| for query slots ``q``
    and key slots ``k`` (u = 0 included: the BOS is a key like any other), ``mean`` = μ over
    every source: a cumulative sum over u, then one product over (batch, t)."""
    a_k = _centred(acg, trace, layer, k, mean).abs()
    a_q = _centred(acg, trace, layer, q, mean).abs() * mask[..., None]
    seen = a_k.cumsum(1)  # [B, t, m]: Σ_{u <= t}
    return (a_q.flatten(0, 1).T @ seen.flatten(0, 1)).double()


def _pair_grad_sums(
    acg: ACGModel,
    trace,
    layer: int,
    mask: Tensor,
    q: Tensor,
    k: Tensor,
    mean: Tensor,
    score_grad: Tensor,
    power: int,
) -> Tensor:
    """``[H, n_q, n_k]``: Σ over (t, u), t valid, of ``|g_h(t, u) (ã_j(t) − μ_j) (ã_m(u) −
    μ_m)|^power``, ``score_grad`` = g ``[B, H, T, T]`` (0 where u > t)."""
    a_k = _centred(acg, trace, layer, k, mean).abs().pow(power)
    a_q = _centred(acg, trace, layer, q, mean).abs().pow(power) * mask[..., None]
    a_q = a_q.flatten(0, 1).T  # [n_q, B·T]
    weight = score_grad.detach().to(a_k.dtype).abs().pow(power)
    return torch.stack([a_q @ (w @ a_k).flatten(0, 1) for w in weight.unbind(1)])


def _candidates(acg: ACGModel, layer: int, mean_abs: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` query-side and key-side sources of ``layer``'s head site most able to move a
    score: E|ã| times the largest query (key) norm over the heads."""
    w = acg.w
    q_norm = torch.zeros_like(mean_abs)
    k_norm = torch.zeros_like(mean_abs)
    for h in range(acg.layout.n_heads):
        q, k, _ = w.qk_vectors(layer, h)
        q_norm = torch.maximum(q_norm, q.norm(dim=-1).to(q_norm))
        k_norm = torch.maximum(k_norm, k.norm(dim=-1).to(k_norm))
    pick = [(mean_abs * norm).topk(min(n, len(mean_abs))).indices.sort().values
            for norm in (q_norm, k_norm)]  # fmt: skip
    return pick[0], pick[1]


@torch.no_grad()
def collect_stats(
    acg: ACGModel,
    batches: Iterable[Tensor],
    *,
    pad_token_id: int | None = None,
    qk: bool = True,
    pair_candidates: int | None = 4096,
    pair_importance: str = "attribution",
    progress: bool = True,
) -> EdgeStats:
    """Accumulate :class:`EdgeStats` over token batches with the level-1 graph; query-key pair
    statistics over at most ``pair_candidates`` sources per side and layer (None: all), priced
    by ``pair_importance`` (one of :data:`PAIR_IMPORTANCE`, see above)."""
    if pair_importance not in PAIR_IMPORTANCE:
        raise ConfigError(
            f"pair_importance must be one of {PAIR_IMPORTANCE}, got {pair_importance!r}"
        )
    layout = acg.layout
    stats = EdgeStats()
    readers = _readers(layout)
    sums = {
        name: {
            (layer, c): torch.zeros(layout.channel_size(ch), dtype=torch.float64)
            for ch, pairs in readers.items()
            for layer, c in pairs
        }
        for name in ("mean", "mean_abs", "mean_sq")
    }
    sums.update(pair={}, qmean={})
    n_pos = n_pairs = 0
    batches = list(batches)
    for tokens in progress_bar(batches, desc="acg: edge statistics", enabled=progress):
        trace = acg.run(tokens, until=layout.n_layers - 1)
        tokens = trace.tokens
        mask = valid_positions(tokens, pad_token_id).float()
        n_pos += int(mask.sum())
        # [positions, layers]: each target layer's weight mask/s2 of a position
        weight = torch.stack([mask / trace.s2[layer] for layer in range(layout.n_layers)], -1)
        weight = weight.reshape(-1, layout.n_layers)
        for channel, pairs in readers.items():
            slots = _batch_slots(layout, channel.read_site, tokens)
            g = acg.gated(trace, channel, slots).reshape(-1, len(slots))
            # one product per moment for every reading layer at once, not a pass each: the
            # readers grow with depth, so this is the build's cubic term. |g·w| = |g|·|w|, and
            # w² = mask/s² as the mask is 0/1
            w = weight[:, [layer for layer, _ in pairs]]
            moments = {
                "mean": w.T @ g,
                "mean_abs": w.abs().T @ g.abs(),
                "mean_sq": w.pow(2).T @ g.pow(2),
            }
            for name, per_reader in moments.items():
                for row, key in zip(per_reader.double(), pairs, strict=True):
                    sums[name][key].index_add_(0, slots, row)
            del g, moments
        for layer in range(layout.n_layers if qk else 0):
            site = layout.head_site(layer)
            slots = _batch_slots(layout, site, tokens)[:-1]  # no bias slot
            a = acg.source_columns(trace, site, slots) / trace.s1[layer][..., None]
            a = a * mask[..., None]
            size = layout.space(site).size
            sums["qmean"].setdefault(layer, torch.zeros(size, dtype=torch.float64))
            sums["qmean"][layer].index_add_(0, slots, a.sum((0, 1)).double())
            sums.setdefault("abs", {}).setdefault(layer, torch.zeros(size, dtype=torch.float64))
            sums["abs"][layer].index_add_(0, slots, a.abs().sum((0, 1)).double())
            if layer == 0:
                n_pairs += int((mask * torch.arange(1, mask.shape[1] + 1)).sum())  # (t, u <= t)
    for key, s in sums["mean"].items():
        stats.mean[key] = (s / max(n_pos, 1)).float()
        stats.mean_abs[key] = (sums["mean_abs"][key] / max(n_pos, 1)).float()
        stats.mean_sq[key] = (sums["mean_sq"][key] / max(n_pos, 1)).float()
    for layer, s in sums["qmean"].items():
        stats.query_mean[layer] = (s / max(n_pos, 1)).float()
        if pair_candidates is None or len(s) <= pair_candidates:
            stats.pair_q[layer] = stats.pair_k[layer] = torch.arange(len(s))
        else:
            mean_abs = (sums["abs"][layer] / max(n_pos, 1)).float()
            stats.pair_q[layer], stats.pair_k[layer] = _candidates(
                acg, layer, mean_abs, pair_candidates
            )
    gen = torch.Generator().manual_seed(0)
    power = _PAIR_POWER.get(pair_importance, 0)
    for tokens in progress_bar(
        batches if qk else [], desc="acg: pair statistics", enabled=progress and qk
    ):
        if power:
            got = sampled_gradients(acg, tokens, gen, pad_token_id)
            trace = got.trace
        else:
            trace = acg.run(tokens, until=layout.n_layers - 1)
        mask = valid_positions(trace.tokens, pad_token_id).float()
        for layer in range(layout.n_layers):
            q, k, mean = stats.pair_q[layer], stats.pair_k[layer], stats.query_mean[layer]
            if power:
                grad = got.scores[layer]
                part = _pair_grad_sums(acg, trace, layer, mask, q, k, mean, grad, power)
            else:
                part = _pair_sums(acg, trace, layer, mask, q, k, mean)
            _accumulate(sums["pair"], layer, part)
    for layer, s in sums["pair"].items():
        if power:
            stats.pair_grad[layer] = s / max(n_pos, 1)
        else:
            stats.pair_abs[layer] = (s / max(n_pairs, 1)).float()
    stats.n_positions, stats.n_pairs, stats.pair_power = n_pos, n_pairs, power
    return stats
