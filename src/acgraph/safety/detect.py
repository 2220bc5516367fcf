"""Detect anomalous computation: inputs whose active features are computed from unusual parents.

Fit (trusted text only): build the global ACG's ranked in-edges on the trusted corpus, then for
every feature, over the positions where it is active, the mean and spread of its contribution
vector ``[c_1..c_K, rest]``: ``c_r = w_r · G_r / s`` is the contribution of its r-th in-edge to its
pre-activation (ACG.md §3) and ``rest`` is the part of the pre-activation its top-K edges do not
account for. Kept per (feature, edge): the trusted range of the contribution (always holding 0:
an absent parent is not anomalous) and its mean and spread. Score: for every active feature at a
position, the largest amount by which one of its edges drives it beyond anything seen on trusted
data (pre-activation units); a position scores its most anomalous feature, an input its most
anomalous position. A parent that drives a feature rarely but legitimately (a rare word) stays
inside the range; one that never drove it does not. The explanation names the features and edges
with the largest excess, with their trusted range, mean and spread.

A second ACG detector, ``acg-attention``, looks at the gates instead of the features: per head,
the largest weight trusted text ever put on each key token followed by a given token
(graph/attention_bounds.py, the bigram kind `acg clean` bounds by); a position scores the most
weight any head puts beyond that on one key, an input its most anomalous position.

Baselines in the same module, fitted on the same trusted data: Mahalanobis distance of the real
model's residual stream (per layer and summed), feature-activation novelty (features rarely
active on trusted data) and, given labels, a logistic probe on pooled residuals (upper reference).

Nothing in the fit path takes a trigger, a payload or a label: see ``fit_detectors``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.errors import ArtifactError, ConfigError
from acgraph.graph import build_acg
from acgraph.graph.attention_bounds import KINDS, AttentionBounds, attention_peaks
from acgraph.graph.forward import ACGModel, Trace
from acgraph.graph.weights import ModelWeights
from acgraph.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from acgraph.progress import progress_bar

FORMAT_VERSION = 2
_EPS = 1e-3
#: an input's score: the mean of its most anomalous positions (one noisy position is not enough)
TOP_POSITIONS = 1


# ---------------------------------------------------------------------- helpers


def _all_gated(acg: ACGModel, trace: Trace, layer: int) -> Tensor:
    """``G`` of every candidate in-edge source of ``layer`` ([B, T, n_candidates]), in the
    candidate order of RankedEdges (channels concatenated)."""
    out = []
    for channel in acg.layout.channels(layer):
        slots = torch.arange(acg.layout.channel_size(channel))
        out.append(acg.gated(trace, channel, slots))
    return torch.cat(out, -1)


@dataclass
class _Active:
    """The active (position, feature) entries of one layer and their contribution vectors."""

    b: Tensor
    t: Tensor
    f: Tensor
    vec: Tensor  # [n, K+1]: top-K edge contributions, then the rest


def _active_contributions(
    acg: ACGModel, trace: Trace, layer: int, index: Tensor, weight: Tensor, mask: Tensor
) -> _Active:
    acts, pre, s = trace.acts[layer], trace.pre[layer], trace.s2[layer]
    b, t, f = ((acts > 0) & mask[..., None]).nonzero(as_tuple=True)
    G = _all_gated(acg, trace, layer)
    g = G[b[:, None], t[:, None], index[f]]  # [n, K]
    c = weight[f] * g / s[b, t][:, None]
    rest = pre[b, t, f] - c.sum(1)
    return _Active(b, t, f, torch.cat([c, rest[:, None]], 1))


# ---------------------------------------------------------------------- the detector


@dataclass
class EdgeDetector:
    """Per feature, the trusted distribution of its in-edge contributions when it is active."""

    index: dict[int, Tensor]  # [F, K] candidate index of each feature's top-K in-edges
    weight: dict[int, Tensor]  # [F, K] virtual weights
    lo: dict[int, Tensor]  # [F, K+1] trusted range of each contribution (holds 0)
    hi: dict[int, Tensor]  # [F, K+1]
    mu: dict[int, Tensor]  # [F, K+1] trusted mean and spread (explanations)
    sigma: dict[int, Tensor]  # [F, K+1]
    count: dict[int, Tensor]  # [F] trusted positions where the feature was active
    n_positions: int
    top_positions: int = TOP_POSITIONS

    @property
    def k(self) -> int:
        return next(iter(self.index.values())).shape[1]

    def feature_z(self, layer: int, a: _Active) -> Tensor:
        return (a.vec - self.mu[layer][a.f]) / self.sigma[layer][a.f]

    def excess(self, layer: int, a: _Active) -> Tensor:
        """Per edge, how far its contribution lies outside its trusted range (pre-activation
        units): input from a parent that never drove the feature like this on trusted data."""
        lo, hi = self.lo[layer][a.f], self.hi[layer][a.f]
        return (a.vec - hi).clamp(min=0) + (lo - a.vec).clamp(min=0)

    def score_trace(
        self, acg: ACGModel, trace: Trace, mask: Tensor, keep: bool = False
    ) -> tuple[Tensor, Tensor, list[tuple[_Active, Tensor, Tensor]]]:
        """(input scores [B], position scores [B, T], per-layer (active entries, z, excess) if
        keep)."""
        B, T = trace.tokens.shape
        pos = torch.zeros(B, T)
        kept = []
        for layer in sorted(self.index):
            a = _active_contributions(
                acg, trace, layer, self.index[layer], self.weight[layer], mask
            )
            ex = self.excess(layer, a)
            # one unprecedented edge is the signal; summing would add every edge's noise
            pos.view(-1).scatter_reduce_(0, a.b * T + a.t, ex.amax(1), reduce="amax")
            if keep:  # z only feeds explanations
                kept.append((a, self.feature_z(layer, a), ex))
        top = pos.topk(min(self.top_positions, T), dim=1).values.mean(1)
        return top, pos, kept


@torch.no_grad()
def fit_edge_detector(
    acg: ACGModel,
    ranked: dict[int, Any],
    batches: Sequence[Tensor],
    *,
    k: int = 128,
    n0: float = 20.0,
    pad_token_id: int | None = 0,
    progress: bool = True,
) -> EdgeDetector:
    """Trusted statistics of each feature's contribution vector, over its active positions."""
    index = {i: r.index[:, :k].contiguous() for i, r in ranked.items()}
    weight = {i: r.weight[:, :k].contiguous() for i, r in ranked.items()}
    n = {i: torch.zeros(idx.shape[0], dtype=torch.float64) for i, idx in index.items()}
    s1 = {i: torch.zeros(idx.shape[0], k + 1, dtype=torch.float64) for i, idx in index.items()}
    s2 = {i: torch.zeros(idx.shape[0], k + 1, dtype=torch.float64) for i, idx in index.items()}
    lo = {i: torch.zeros(idx.shape[0], k + 1) for i, idx in index.items()}
    hi = {i: torch.zeros(idx.shape[0], k + 1) for i, idx in index.items()}
    n_pos = 0
    for tokens in progress_bar(batches, desc="detect: fit", enabled=progress):
        trace = acg.run(tokens)
        mask = valid_positions(trace.tokens, pad_token_id)
        n_pos += int(mask.sum())
        for layer in index:
            a = _active_contributions(acg, trace, layer, index[layer], weight[layer], mask)
            v = a.vec.double()
            n[layer].index_add_(0, a.f, torch.ones_like(a.f, dtype=torch.float64))
            s1[layer].index_add_(0, a.f, v)
            s2[layer].index_add_(0, a.f, v * v)
            rows = a.f[:, None].expand_as(a.vec)
            lo[layer].scatter_reduce_(0, rows, a.vec, "amin")  # starting at 0: ranges hold 0
            hi[layer].scatter_reduce_(0, rows, a.vec, "amax")
    mu, sigma = {}, {}
    for layer in index:
        cnt = n[layer][:, None].clamp(min=1)
        m = s1[layer] / cnt
        var = (s2[layer] / cnt - m * m).clamp(min=0)
        # Why a floor: an edge that never moved on trusted data would turn any wiggle into a
        # huge z; scale it to the feature's typical total input (sum of |contributions|).
        scale = m.abs().sum(1, keepdim=True)
        active = n[layer] > 0
        typical = scale[active].median() if bool(active.any()) else torch.tensor(1.0)
        scale = torch.where(active[:, None], scale, typical)
        floor = 0.05 * scale + _EPS
        sig = (var + floor**2).sqrt()
        # Why shrinkage: a feature seen active a handful of times has a meaningless spread;
        # pull it toward the layer's typical spread per edge rank (weight n0 pseudo-counts).
        prior = sig[active].median(0).values if bool(active.any()) else sig.mean(0)
        cnt = n[layer][:, None]
        mu[layer] = m.float()
        sigma[layer] = ((cnt * sig**2 + n0 * prior**2) / (cnt + n0)).sqrt().float()
    count = {i: c.float() for i, c in n.items()}
    return EdgeDetector(index, weight, lo, hi, mu, sigma, count, n_pos)


# ---------------------------------------------------------------------- baselines


@dataclass
class Mahalanobis:
    """Per layer: mean and inverse covariance of the real model's residual stream."""

    mean: dict[int, Tensor]
    prec: dict[int, Tensor]

    @torch.no_grad()
    def position_scores(self, model: Any, tokens: Tensor) -> dict[int, Tensor]:
        names = {f"blocks.{i}.hook_resid_post": i for i in self.mean}
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        out = {}
        for name, i in names.items():
            x = cache[name] - self.mean[i]
            out[i] = torch.einsum("btd,de,bte->bt", x, self.prec[i], x) / x.shape[-1]
        return out


@torch.no_grad()
def fit_mahalanobis(
    model: Any, batches: Sequence[Tensor], pad_token_id: int | None = 0, shrink: float = 1e-2
) -> Mahalanobis:
    n_layers = model.cfg.n_layers
    names = {f"blocks.{i}.hook_resid_post": i for i in range(n_layers)}
    sums: dict[int, list] = {}
    for tokens in batches:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        mask = valid_positions(tokens, pad_token_id)
        for name, i in names.items():
            x = cache[name][mask].double()
            s = sums.setdefault(i, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.T @ x
    mean, prec = {}, {}
    for i, (cnt, sx, sxx) in sums.items():
        m = sx / cnt
        cov = sxx / cnt - torch.outer(m, m)
        cov = cov + shrink * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        mean[i], prec[i] = m.float(), torch.linalg.inv(cov).float()
    return Mahalanobis(mean, prec)


@dataclass
class Novelty:
    """Features rarely active on trusted data: a position scores its rarest active feature."""

    count: dict[int, Tensor]
    n_positions: int

    def position_scores(self, trace: Trace, mask: Tensor) -> Tensor:
        B, T = trace.tokens.shape
        pos = torch.zeros(B, T)
        for layer, cnt in self.count.items():
            surprise = -torch.log((cnt + 1) / (self.n_positions + 2))
            s = torch.where(trace.acts[layer] > 0, surprise, torch.zeros(()))
            pos = torch.maximum(pos, s.amax(-1))
        return pos * mask


@dataclass
class Probe:
    """Logistic regression on mean-pooled residuals of every layer (needs labels)."""

    w: Tensor
    b: Tensor
    mean: Tensor
    std: Tensor

    @torch.no_grad()
    def scores(self, model: Any, tokens: Tensor, pad_token_id: int | None = 0) -> Tensor:
        return (_pooled(model, tokens, pad_token_id) - self.mean) / self.std @ self.w + self.b


@torch.no_grad()
def _pooled(model: Any, tokens: Tensor, pad_token_id: int | None) -> Tensor:
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    mask = valid_positions(tokens, pad_token_id).float()[..., None]
    feats = [(cache[n] * mask).sum(1) / mask.sum(1).clamp(min=1) for n in names]
    return torch.cat(feats, -1)


def fit_probe(
    model: Any, tokens: Tensor, labels: Tensor, pad_token_id: int | None = 0, l2: float = 1e-2
) -> Probe:
    x = _pooled(model, tokens, pad_token_id)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    y = labels.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(w.detach(), b.detach(), mean, std)


# ---------------------------------------------------------------------- all detectors


def attention_excess(bounds: AttentionBounds, trace: Trace, mask: Tensor) -> Tensor:
    """``[B, T]``: per query position, the most weight one head puts on one key beyond the
    largest weight trusted text gave that key's pair in that head (0 where within)."""
    B, T = trace.tokens.shape
    pos = torch.zeros(B, T)
    for layer, pattern in enumerate(trace.pattern):
        excess = bounds.excess(layer, pattern, trace.tokens)
        pos = torch.maximum(pos, excess.amax(dim=(1, 3)))
    return pos * mask


@dataclass
class Detectors:
    """The ACG edge detector and the unsupervised baselines, fitted on trusted data."""

    weights: ModelWeights
    edge: EdgeDetector
    mahalanobis: Mahalanobis
    novelty: Novelty
    pad_token_id: int | None = 0
    probe: Probe | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attention: AttentionBounds | None = None  # trusted peaks (floor 0) for acg-attention

    @property
    def acg(self) -> ACGModel:
        if not hasattr(self, "_acg"):
            self._acg = ACGModel(self.weights)
        return self._acg

    def names(self) -> list[str]:
        layers = sorted(self.mahalanobis.mean)
        out = ["acg-edges"] + (["acg-attention"] if self.attention is not None else [])
        out += ["novelty", "mahalanobis"] + [f"mahalanobis-L{i}" for i in layers]
        return out + (["probe (supervised)"] if self.probe is not None else [])

    @torch.no_grad()
    def score(
        self, tokens: Tensor, batch_size: int = 32, only: str | None = None
    ) -> dict[str, Tensor]:
        """Input-level scores of every detector (or ``only`` one), higher = more anomalous."""
        names = self.names() if only is None else [only]
        if only is not None and only not in self.names():
            raise ConfigError(f"unknown detector {only!r}; known: {self.names()}")
        want = set(names)
        maha = any(n.startswith("mahalanobis") for n in want)
        out: dict[str, list[Tensor]] = {n: [] for n in names}
        model = self.weights.model
        for start in range(0, tokens.shape[0], batch_size):
            tok = tokens[start : start + batch_size]
            mask = valid_positions(tok, self.pad_token_id)
            if want & {"acg-edges", "acg-attention", "novelty"}:
                trace = self.acg.run(tok)
                if "acg-edges" in want:
                    out["acg-edges"].append(self.edge.score_trace(self.acg, trace, mask)[0])
                if "acg-attention" in want:
                    excess = attention_excess(self.attention, trace, mask)
                    out["acg-attention"].append(excess.amax(1))
                if "novelty" in want:
                    out["novelty"].append(self.novelty.position_scores(trace, mask).amax(1))
            if maha:
                per_layer = self.mahalanobis.position_scores(model, tok)
                if "mahalanobis" in want:
                    total = sum(per_layer.values())
                    out["mahalanobis"].append(torch.where(mask, total, 0).amax(1))
                for i, d in per_layer.items():
                    if f"mahalanobis-L{i}" in want:
                        out[f"mahalanobis-L{i}"].append(torch.where(mask, d, 0).amax(1))
            if "probe (supervised)" in want:
                out["probe (supervised)"].append(self.probe.scores(model, tok, self.pad_token_id))
        return {n: torch.cat(v) for n, v in out.items()}

    def score_fn(self, name: str) -> Callable[[Tensor], Tensor]:
        """A single detector's input scores (the attacker's objective)."""
        return lambda tokens: self.score(tokens, only=name)[name]

    @torch.no_grad()
    def explain(self, tokens: Tensor, n_features: int = 5, n_edges: int = 3) -> list[dict]:
        """Per input: its most anomalous position, features there, and their most unusual edges
        (label, contribution, excess over the trusted range, trusted range, mean ± std)."""
        trace = self.acg.run(tokens)
        mask = valid_positions(trace.tokens, self.pad_token_id)
        inp, pos, kept = self.edge.score_trace(self.acg, trace, mask, keep=True)
        layout = self.weights.layout
        vocab = _token_strings(self.weights.model)
        out = []
        for b in range(tokens.shape[0]):
            t = int(pos[b].argmax())
            feats = []
            for layer, (a, z, ex) in zip(sorted(self.edge.index), kept, strict=True):
                sel = ((a.b == b) & (a.t == t)).nonzero(as_tuple=True)[0]
                for j in sel.tolist():
                    feats.append((float(ex[j].max()), layer, j, a, z, ex))
            feats.sort(key=lambda x: -x[0])
            items = []
            for score, layer, j, a, z, ex in feats[:n_features]:
                f = int(a.f[j])
                order = ex[j].argsort(descending=True)[:n_edges].tolist()
                edges = []
                for r in order:
                    if r == self.edge.k:
                        label = "rest (edges outside the top-K)"
                    else:
                        label = _edge_label(layout, self.edge, layer, f, r, vocab)
                    edges.append(
                        {
                            "edge": label,
                            "contribution": float(a.vec[j, r]),
                            "trusted_range": [
                                float(self.edge.lo[layer][f, r]),
                                float(self.edge.hi[layer][f, r]),
                            ],
                            "trusted_mean": float(self.edge.mu[layer][f, r]),
                            "trusted_std": float(self.edge.sigma[layer][f, r]),
                            "z": float(z[j, r]),
                            "excess": float(ex[j, r]),
                        }
                    )
                items.append(
                    {
                        "feature": f"L{layer}/{f}",
                        "score": score,
                        "activation": float(trace.acts[layer][b, t, f]),
                        "trusted_active_rate": float(self.edge.count[layer][f])
                        / max(self.edge.n_positions, 1),
                        "edges": edges,
                    }
                )
            toks = trace.tokens[b].tolist()
            out.append(
                {
                    "score": float(inp[b]),
                    "position": t,
                    "token": vocab[toks[t]] if vocab else toks[t],
                    "features": items,
                }
            )
        return out

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        t: dict[str, Tensor] = {}
        for i in self.edge.index:
            t[f"edge.index.{i}"] = self.edge.index[i]
            t[f"edge.weight.{i}"] = self.edge.weight[i]
            t[f"edge.lo.{i}"] = self.edge.lo[i]
            t[f"edge.hi.{i}"] = self.edge.hi[i]
            t[f"edge.mu.{i}"] = self.edge.mu[i]
            t[f"edge.sigma.{i}"] = self.edge.sigma[i]
            t[f"edge.count.{i}"] = self.edge.count[i]
            t[f"novelty.count.{i}"] = self.novelty.count[i].clone()  # may alias edge.count
        for i in self.mahalanobis.mean:
            t[f"maha.mean.{i}"] = self.mahalanobis.mean[i]
            t[f"maha.prec.{i}"] = self.mahalanobis.prec[i]
        meta = dict(self.meta)
        if self.attention is not None:
            t["attention.pairs"], t["attention.peak"] = self.attention.pairs, self.attention.peak
            meta.update(attention_kind=self.attention.kind, attention_vocab=self.attention.vocab)
        atomic_save_tensors(folder / "detector.safetensors", t)
        meta.update(
            format_version=FORMAT_VERSION,
            kind="acgraph-detector",
            k=self.edge.k,
            top_positions=self.edge.top_positions,
            n_positions=self.edge.n_positions,
            pad_token_id=self.pad_token_id,
            d_model=int(self.weights.cfg.d_model),
            d_sae=[int(x.shape[0]) for x in self.edge.index.values()],
        )
        return atomic_write_json(folder / "detector.json", meta)


def load_detectors(folder: str | Path, model: Any, transcoders: dict[int, Any]) -> Detectors:
    folder = Path(folder)
    if not (folder / "detector.json").is_file():
        raise ArtifactError(f"{folder} holds no detector (detector.json missing)")
    meta = read_json(folder / "detector.json")
    if meta.get("kind") != "acgraph-detector" or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}/detector.json is not a detector of format {FORMAT_VERSION}")
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    weights = ModelWeights(model, transcoders, bos)
    if meta["d_model"] != model.cfg.d_model or meta["d_sae"] != weights.layout.d_sae:
        raise ArtifactError(f"the detector in {folder} was fitted on another model or dictionary")
    t = load_tensors(folder / "detector.safetensors")
    layers = sorted({int(k.rsplit(".", 1)[1]) for k in t if k.startswith("edge.index.")})
    get = lambda prefix: {i: t[f"{prefix}.{i}"] for i in layers}  # noqa: E731
    edge = EdgeDetector(
        get("edge.index"),
        get("edge.weight"),
        get("edge.lo"),
        get("edge.hi"),
        get("edge.mu"),
        get("edge.sigma"),
        get("edge.count"),
        meta["n_positions"],
        int(meta.get("top_positions", TOP_POSITIONS)),
    )
    maha_layers = sorted({int(k.rsplit(".", 1)[1]) for k in t if k.startswith("maha.mean.")})
    maha = Mahalanobis(
        {i: t[f"maha.mean.{i}"] for i in maha_layers},
        {i: t[f"maha.prec.{i}"] for i in maha_layers},
    )
    nov = Novelty(get("novelty.count"), meta["n_positions"])
    attention = None
    if "attention.pairs" in t:  # detectors fitted before acg-attention have none
        if meta.get("attention_kind") not in KINDS:
            raise ArtifactError(f"{folder}/detector.json: unknown attention_kind")
        attention = AttentionBounds(
            t["attention.pairs"], t["attention.peak"], int(meta["attention_vocab"]), 0.0,
            meta["attention_kind"],
        )  # fmt: skip
    return Detectors(weights, edge, maha, nov, meta.get("pad_token_id"), meta=meta,
                     attention=attention)  # fmt: skip


def fit_detectors(
    model: Any,
    transcoders: dict[int, Any],
    batches: Sequence[Tensor],
    *,
    k: int = 128,
    pad_token_id: int | None = 0,
    progress: bool = True,
) -> Detectors:
    """Fit every unsupervised detector on ``batches`` of trusted token ids (BOS first).

    Deliberately takes nothing else: no trigger, payload or labels reach the fit."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    batches = list(batches)
    graph = build_acg(model, transcoders, batches, max_k=max(k, 1), qk=False)
    acg = graph.model()
    edge = fit_edge_detector(
        acg, graph.edges, batches, k=k, pad_token_id=pad_token_id, progress=progress
    )
    maha = fit_mahalanobis(model, batches, pad_token_id)
    nov = Novelty(dict(edge.count), edge.n_positions)
    attention = attention_peaks(acg, batches, 0.0, pad_token_id)
    det = Detectors(graph.weights, edge, maha, nov, pad_token_id, attention=attention)
    det._acg = acg
    return det


def _token_strings(model: Any) -> list[str] | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    return tok.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))


def _edge_label(layout: Any, edge: EdgeDetector, layer: int, f: int, r: int, vocab) -> str:
    idx = int(edge.index[layer][f, r])
    channels = layout.channels(layer)
    offset = 0
    for channel in channels:
        size = layout.channel_size(channel)
        if idx < offset + size:
            source = layout.source_label(channel.read_site, idx - offset, vocab)
            return source if channel.kind == "direct" else f"[{channel.name} ← {source}]"
        offset += size
    raise IndexError(idx)


# ---------------------------------------------------------------------- metrics


def auroc(neg: Tensor, pos: Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    neg, pos = neg.double().flatten(), pos.double().flatten()
    if neg.numel() == 0 or pos.numel() == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).double().mean()
    eq = (pos[:, None] == neg[None, :]).double().mean()
    return float(gt + 0.5 * eq)


def tpr_at_fpr(neg: Tensor, pos: Tensor, fpr: float = 0.01) -> float:
    """Fraction of positives above the threshold that at most ``fpr`` of negatives exceed."""
    neg = neg.double().flatten().sort(descending=True).values
    allowed = int(math.floor(fpr * neg.numel()))
    thr = neg[min(allowed, neg.numel() - 1)]
    return float((pos.double() > thr).float().mean())
