"""Tuned formulas: the fitted graph's edge weights trained end to end (level "2t" / "3t").

Fitted formulas (refit.py) make each feature's pre-activation right on average, one layer at a
time, but a pruned graph's errors compound: small misses in early features move every later
one and the logits. Here the kept structure is fixed (each feature's k in-edges from the
fitted formulas and, with ``pairs``, each head's top query-key source pairs) and only their
weights and biases are trained together so the graph's next-token distribution matches the
original model's, KL(model ‖ ACG), on a corpus. The graph stays "Z = 3·A + 4·B" over the same
sources with the same number of edges; only the coefficients change. With validation contexts
the run ends at its lowest held-out KL (checked every ``validate_every`` steps, step 0
included), so tuning never returns formulas worse than the fitted ones it started from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.dictionaries.finetune import kl_training, token_rows
from acgraph.errors import ConfigError

from .forward import ACGModel, ChannelEdges, LayerEdges, QKPairs
from .prune import RankedPairs
from .refit import FittedLayer, _split


@dataclass
class TunedPairs:
    """One head's kept pair weights after tuning (the top ``len(weight)`` ranked pairs)."""

    weight: Tensor  # [P]
    query_vec: Tensor  # [d_head]


#: one k's tuned formulas per layer, and its tuned QK pairs per layer and head (empty: level 2)
Tuned = tuple[dict[int, FittedLayer], dict[int, dict[int, TunedPairs]]]


class _Scatter:
    """Writes a flat parameter vector into a fixed sparsity pattern as a dense matrix, so the
    graph runs dense matmuls and gradients reach the vector."""

    def __init__(self, rows: Tensor, cols: Tensor, shape: tuple[int, int], order: Tensor):
        self.rows, self.cols, self.shape, self.order = rows, cols, shape, order

    def __call__(self, values: Tensor) -> Tensor:
        out = torch.zeros(self.shape, dtype=values.dtype)
        return out.index_put((self.rows, self.cols), values[self.order], accumulate=True)


def _layer_edges(ranked, layer_fit: FittedLayer) -> tuple[LayerEdges, list[_Scatter]]:
    """Dense kept edges of one layer, and how to refill each channel from ``weight.flatten()``."""
    n_feat, k = layer_fit.weight.shape
    chan, slot = _split(ranked, layer_fit.index)
    flat = torch.arange(n_feat * k).reshape(n_feat, k)
    targets = torch.arange(n_feat)[:, None].expand(n_feat, k)
    channels, fills = [], []
    for c, channel in enumerate(ranked.channels):
        sel = chan == c
        if not bool(sel.any()):
            continue
        used, local = torch.unique(slot[sel], return_inverse=True)
        fill = _Scatter(targets[sel], local, (n_feat, used.numel()), flat[sel])
        channels.append(ChannelEdges(channel, used, fill(layer_fit.weight.flatten())))
        fills.append(fill)
    return LayerEdges(channels, layer_fit.bias.clone()), fills


def _head_pairs(r: RankedPairs, n: int) -> tuple[QKPairs, _Scatter, Tensor, Tensor]:
    q, k = r.q[:n], r.k[:n]
    q_used, q_local = torch.unique(q, return_inverse=True)
    k_used, k_local = torch.unique(k, return_inverse=True)
    fill = _Scatter(q_local, k_local, (q_used.numel(), k_used.numel()), torch.arange(len(q)))
    w = r.weight[:n]
    corr = torch.zeros(k_used.numel()).index_add(0, k_local, r.mean_q[q] * w)
    return QKPairs(q_used, k_used, fill(w), r.query_vec.clone(), -corr), fill, k_local, r.mean_q[q]


class _Formulas:
    """The tunable graph: fixed edges and pairs whose weights are leaf tensors."""

    def __init__(self, graph, k: int, pairs: int | None):
        fits = graph.fitted[k]
        self.index = {i: f.index for i, f in fits.items()}
        self.n_edges = {i: f.n_edges for i, f in fits.items()}
        # adaptive fan-in: a feature's unused slots stay zero (they are not edges)
        self.used = {i: f.used().to(f.weight.dtype) for i, f in fits.items()}
        self.w = {i: f.weight.clone().requires_grad_(True) for i, f in fits.items()}
        self.b = {i: f.bias.clone().requires_grad_(True) for i, f in fits.items()}
        self.edges, self.fills = {}, {}
        for i, f in fits.items():
            self.edges[i], self.fills[i] = _layer_edges(graph.edges[i], f)
        self.qk: dict[int, dict[int, QKPairs]] = {}
        self.pair_fill: dict[tuple[int, int], tuple[_Scatter, Tensor, Tensor]] = {}
        self.pw: dict[tuple[int, int], Tensor] = {}
        self.qv: dict[tuple[int, int], Tensor] = {}
        for i, heads in graph.pairs.items() if pairs is not None else ():
            self.qk[i] = {}
            for h, r in heads.items():
                self.qk[i][h], fill, k_local, mean_q = _head_pairs(r, pairs)
                self.pair_fill[i, h] = (fill, k_local, mean_q)
                self.pw[i, h] = r.weight[: len(k_local)].clone().requires_grad_(True)
                self.qv[i, h] = r.query_vec.clone().requires_grad_(True)
        self.acg = ACGModel(graph.weights, self.edges, self.qk)

    def parameters(self) -> dict[str, Tensor]:
        named = {f"w.L{i}": w for i, w in self.w.items()}
        named.update({f"b.L{i}": b for i, b in self.b.items()})
        named.update({f"pw.L{i}H{h}": w for (i, h), w in self.pw.items()})
        named.update({f"qv.L{i}H{h}": v for (i, h), v in self.qv.items()})
        return named

    def refresh(self) -> None:
        """Write the current parameters into the graph's edges and pairs (differentiably)."""
        for i, e in self.edges.items():
            flat = (self.w[i] * self.used[i]).flatten()
            for ce, fill in zip(e.channels, self.fills[i], strict=True):
                ce.weight = fill(flat)
            e.bias = self.b[i]
        for (i, h), (fill, k_local, mean_q) in self.pair_fill.items():
            w, p = self.pw[i, h], self.qk[i][h]
            p.weight, p.query_vec = fill(w), self.qv[i, h]
            p.key_corr = -torch.zeros(len(p.k_slots)).index_add(0, k_local, mean_q * w)

    def result(self) -> Tuned:
        layers = {
            i: FittedLayer(
                self.index[i].clone(),
                (self.w[i] * self.used[i]).detach(),
                self.b[i].detach().clone(),
                None if self.n_edges[i] is None else self.n_edges[i].clone(),
            )
            for i in self.w
        }
        heads: dict[int, dict[int, TunedPairs]] = {}
        for (i, h), w in self.pw.items():
            heads.setdefault(i, {})[h] = TunedPairs(
                w.detach().clone(), self.qv[i, h].detach().clone()
            )
        return layers, heads


def tune_formulas(
    graph,
    k: int,
    batches: Sequence[Tensor],
    *,
    pairs: int | None = None,
    steps: int = 300,
    lr: float = 1e-4,
    lr_decay: float = 0.5,
    rows: int = 16,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    validation_batches: Sequence[Tensor] = (),
    validate_every: int = 50,
    validation: list[tuple[int, float]] | None = None,
    progress: bool = True,
) -> tuple[dict[int, FittedLayer], dict[int, dict[int, TunedPairs]], list[float]]:
    """Train the weights of ``graph``'s fitted k-edge formulas (and, with ``pairs``, the kept
    query-key pair weights) end to end on ``batches``. Returns the tuned formulas, the tuned
    pairs (empty without ``pairs``) and the KL per step. ``lr_decay``: the fraction of the
    steps at the end over which the rate falls linearly to zero. ``checkpoint``: a file the run is
    saved to every ``checkpoint_every`` steps (``resume`` continues from it).
    ``validation_batches``: held-out token batches; the result is the weights of the lowest
    KL on them, and ``validation`` (a list) receives the (step, KL) history."""
    if k not in graph.fitted:
        raise ConfigError(
            f"no fitted formulas for k={k} to tune (fitted: {sorted(graph.fitted)}; "
            "`acg build --fit-k`)"
        )
    if pairs is not None and not graph.pairs:
        raise ConfigError("this graph was built without QK pairs (level 3)")
    if pairs is not None and graph.weights.rotary:
        raise ConfigError("tuning QK pairs is not supported for rotary models (tune without pairs)")
    if steps < 1 or rows < 1:
        raise ConfigError(f"steps and rows must be at least 1, got {steps} and {rows}")
    data = token_rows(batches)
    model = graph.weights.model
    formulas = _Formulas(graph, k, pairs)

    def run(batch: Tensor, mask: Tensor) -> Tensor:
        formulas.refresh()
        return formulas.acg.run(batch, grad=True).logits

    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)

    @torch.no_grad()
    def validate() -> float:
        formulas.refresh()
        total, count = 0.0, 0
        for batch in validation_batches:
            mask = valid_positions(batch, pad)
            target = model(batch).log_softmax(-1)[mask]
            logp = formulas.acg.run(batch).logits.log_softmax(-1)[mask]
            total += float((target.exp() * (target - logp)).sum())
            count += int(mask.sum())
        return total / max(count, 1)

    # only the formulas learn: the model's and the transcoders' own weights get no gradients
    frozen = [p for m in (model, *graph.weights.transcoders) for p in m.parameters()]
    frozen = [p for p in frozen if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        losses = kl_training(
            model, formulas.parameters(), data, run, steps=steps, lr=lr, rows=rows, seed=seed,
            lr_decay=lr_decay, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            resume=resume, validate=validate if len(validation_batches) else None,
            validate_every=validate_every, validation=validation,
            desc=f"acg: tune k={k}", progress=progress,
        )  # fmt: skip
    finally:
        for p in frozen:
            p.requires_grad_(True)
    layers, heads = formulas.result()
    return layers, heads, losses
