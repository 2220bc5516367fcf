"""Build, save and load the global ACG of a model and its transcoders.

``build_acg`` runs the level-1 graph over a corpus to collect edge statistics, then ranks every
feature's in-edges (and, for level 3, every head's query-key source pairs) and keeps the best
``max_k`` (``max_pairs``) of each, sorted, so any ``k <= max_k`` is a prefix. On disk (the
workspace's ``acg/`` folder)::

    manifest.json        format version, model and transcoder specs, layout, settings, sizes
    edges.safetensors    per layer ``L{l}.index|weight|mean|importance|total_mean``,
                         per head ``L{l}H{h}.q|k|weight|importance|query_vec|mean_q``
                         per fitted k ``fit{k}.L{l}.index|weight|bias`` (fitted formulas;
                         adaptive fan-in adds ``n_edges``, each feature's used slots)
                         per tuned k ``tune{k}.L{l}.index|weight|bias[|n_edges]`` and, when tuned
                         with QK pairs, ``tune{k}.L{l}H{h}.weight|query_vec`` (tune.py)
    stats.safetensors    E[G/s], E[|G|/s], E[(G/s)²] per (layer, channel, source)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ArtifactError, ConfigError
from acgraph.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

from .attention_bounds import AttentionBounds
from .forward import ACGModel
from .prune import RankedEdges, RankedPairs, rank_edges, rank_pairs, select_edges, select_pairs
from .refit import FANIN, LOSSES, FittedLayer, feature_prices, fit_edges, fitted_layer_edges
from .stats import EdgeStats, collect_stats
from .tune import Tuned, TunedPairs
from .weights import ModelWeights

FORMAT_VERSION = 1


class TranscoderSet(dict):
    """Transcoders by layer, plus the attention bounds of a cleaned set (None elsewhere):
    :class:`ModelWeights` picks them up, so every command runs a cleaned graph bounded."""

    attention_bounds: AttentionBounds | None = None


def load_transcoders(spec: str) -> TranscoderSet:
    """MLP transcoders by layer from anything
    :func:`acgraph.dictionaries.formats.load_transcoder_folder` reads (``organism`` included),
    with the folder's attention bounds where it has them."""
    from acgraph.dictionaries.formats import load_transcoder_folder

    found = TranscoderSet()
    if spec != "organism" and Path(spec).expanduser().is_dir():
        found.attention_bounds = AttentionBounds.load(Path(spec).expanduser())
    for d in load_transcoder_folder(spec):
        parts = d.cfg.hook_out.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ArtifactError(f"{spec}: output hook {d.cfg.hook_out} is not a block's MLP output")
        layer = int(parts[1])
        if layer in found:
            raise ArtifactError(f"{spec} holds two dictionaries for layer {layer}")
        found[layer] = d
    return found


@dataclass
class ACGraph:
    """A built graph: the model's weights plus ranked edges and pairs."""

    weights: ModelWeights
    edges: dict[int, RankedEdges]
    pairs: dict[int, dict[int, RankedPairs]]
    stats: EdgeStats
    meta: dict[str, Any]
    fitted: dict[int, dict[int, FittedLayer]] = field(default_factory=dict)
    # k -> (tuned formulas per layer, tuned QK pairs per layer and head; empty: level 2 only)
    tuned: dict[int, Tuned] = field(default_factory=dict)

    @property
    def layout(self):
        return self.weights.layout

    @property
    def max_k(self) -> int:
        return min(r.max_k for r in self.edges.values())

    def tuned_pairs(self, k: int) -> int | None:
        """The QK pairs per head the k-edge formulas were tuned with (None: level 2): the
        most any head kept, as a head with fewer source pairs than asked keeps them all."""
        sizes = [len(t.weight) for heads in self.tuned[k][1].values() for t in heads.values()]
        return max(sizes) if sizes else None

    def model(
        self,
        k: int | None = None,
        pairs: int | None = None,
        fit: bool = False,
        tuned: bool = False,
    ) -> ACGModel:
        """The runnable graph: ``k`` in-edges per feature (None: all, level 1) and, for level
        3, ``pairs`` query-key source pairs per head (None: exact attention from the graph).
        ``fit`` uses the least-squares weights fitted for this k (see refit.py); ``tuned``
        the weights trained end to end from them (tune.py; level 3 only with the pairs they
        were tuned with)."""
        edges = None
        if k is not None:
            if k < 1:
                raise ConfigError(f"k must be at least 1, got {k}")
            if k > self.max_k:
                raise ConfigError(f"k={k} exceeds the {self.max_k} edges per feature stored")
            if tuned:
                if k not in self.tuned:
                    raise ConfigError(f"no tuned formulas for k={k} (tuned: {sorted(self.tuned)})")
                if pairs is not None and pairs != self.tuned_pairs(k):
                    raise ConfigError(
                        f"the k={k} formulas were tuned with {self.tuned_pairs(k)} QK pairs "
                        f"per head, not {pairs}"
                    )
                edges = {
                    i: fitted_layer_edges(self.weights, self.edges[i], i, f)
                    for i, f in self.tuned[k][0].items()
                }
            elif fit:
                if k not in self.fitted:
                    raise ConfigError(
                        f"no fitted weights for k={k} (fitted: {sorted(self.fitted)})"
                    )
                edges = {
                    i: fitted_layer_edges(self.weights, self.edges[i], i, f)
                    for i, f in self.fitted[k].items()
                }
            else:
                edges = {i: select_edges(self.weights, r, i, k) for i, r in self.edges.items()}
        qk = None
        if pairs is not None:
            if not self.pairs:
                raise ConfigError("this graph was built without QK pairs (level 3)")
            if pairs < 1:
                raise ConfigError(f"pairs must be at least 1, got {pairs}")
            w = self.weights
            qk = {
                i: {h: select_pairs(r, pairs, w, i, h) for h, r in heads.items()}
                for i, heads in self.pairs.items()
            }
            if tuned and k is not None:
                for i, heads in self.tuned[k][1].items():
                    for h, t in heads.items():
                        qk[i][h] = select_pairs(
                            replace(self.pairs[i][h], weight=t.weight, query_vec=t.query_vec),
                            pairs,
                        )
        return ACGModel(self.weights, edges, qk)

    def mean_in_edges(self, k: int | None, formula: str = "pruned") -> float | None:
        """In-edges per feature of a configuration (None: level 1, every edge); differs
        from k only for fitted or tuned formulas with adaptive fan-in."""
        if k is None:
            return None
        if formula == "fitted":
            return _mean_edges(self.fitted[k])
        if formula == "tuned":
            return _mean_edges(self.tuned[k][0])
        return float(k)

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path, *, stats: bool = True) -> dict[str, int]:
        """Write edges, statistics and, last, the manifest (what a reader trusts). With
        ``stats=False`` the folder's statistics file is kept as it is: a tune changes only
        edges, and rewriting gigabytes of unchanged statistics (4.5 GB for SmolLM2's 30 layers)
        is what ran that tune out of memory."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for layer, r in self.edges.items():
            for name in ("index", "weight", "mean", "importance", "total_mean"):
                tensors[f"L{layer}.{name}"] = getattr(r, name)
        for layer, heads in self.pairs.items():
            for h, p in heads.items():
                for name in ("q", "k", "weight", "importance", "query_vec"):
                    tensors[f"L{layer}H{h}.{name}"] = getattr(p, name)
                tensors[f"L{layer}H{h}.mean_q"] = p.mean_q.clone()  # shared per layer
        tuned_layers = {k: layers for k, (layers, _) in self.tuned.items()}
        for prefix, formulas in (("fit", self.fitted), ("tune", tuned_layers)):
            for k, layers in formulas.items():
                for layer, f in layers.items():
                    for name in ("index", "weight", "bias", "n_edges"):
                        if getattr(f, name) is not None:
                            tensors[f"{prefix}{k}.L{layer}.{name}"] = getattr(f, name)
        for k, (_, heads) in self.tuned.items():
            for layer, hs in heads.items():
                for h, t in hs.items():
                    tensors[f"tune{k}.L{layer}H{h}.weight"] = t.weight
                    tensors[f"tune{k}.L{layer}H{h}.query_vec"] = t.query_vec
        edges_path = atomic_save_tensors(folder / "edges.safetensors", tensors)
        stats_path = folder / "stats.safetensors"
        if stats or not stats_path.exists():
            stats_path = atomic_save_tensors(stats_path, self.stats.tensors())
        sizes = {
            "edges_bytes": edges_path.stat().st_size,
            "stats_bytes": stats_path.stat().st_size,
        }
        self.meta["sizes"] = sizes
        atomic_write_json(folder / "manifest.json", self.meta)
        return sizes


@torch.no_grad()
def build_acg(
    model: Any,
    transcoders: dict[int, Any],
    batches: list[Tensor],
    *,
    max_k: int = 64,
    max_pairs: int = 16384,
    qk: bool = True,
    pair_candidates: int | None = 4096,
    fit_ks: Sequence[int] = (),
    fit_pool: int = 4,
    fit_fanin: str = "fixed",
    max_fanin: int | None = None,
    fit_importance: str = "fisher",
    fit_loss: str = "squared",
    pair_importance: str = "attribution",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> ACGraph:
    """Collect statistics on ``batches`` (token tensors starting with BOS), rank edges, and fit
    formulas for every k in ``fit_ks`` (each <= ``max_k``): k edges chosen greedily from the top
    ``fit_pool``·k ranked ones (at most ``max_k``; 1: the top k), least-squares weights.
    ``fit_fanin="adaptive"``: k edges per feature on average over each layer, at most
    ``max_fanin`` (default 4·k) for one feature, each feature's errors priced by
    ``fit_importance`` (refit.py); ``fit_loss="censored"``: errors where a feature is off
    count only when they would turn it on. QK pairs are ranked by ``pair_importance`` (stats.py)."""
    if max_k < 1:
        raise ConfigError(f"max_k must be at least 1, got {max_k}")
    if fit_pool < 1:
        raise ConfigError(f"fit_pool must be at least 1, got {fit_pool}")
    if pair_candidates is not None and pair_candidates < 1:
        raise ConfigError(f"pair_candidates must be at least 1, got {pair_candidates}")
    if any(not 1 <= k <= max_k for k in fit_ks):
        raise ConfigError(f"every fitted k must be in 1..max_k={max_k}, got {list(fit_ks)}")
    if fit_fanin not in FANIN:
        raise ConfigError(f"fit_fanin must be one of {FANIN}, got {fit_fanin!r}")
    if fit_loss not in LOSSES:
        raise ConfigError(f"fit_loss must be one of {LOSSES}, got {fit_loss!r}")
    if max_fanin is not None and any(not k <= max_fanin for k in fit_ks):
        raise ConfigError(f"max_fanin ({max_fanin}) must be at least every fitted k {list(fit_ks)}")
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    start = time.perf_counter()
    weights = ModelWeights(model, transcoders, bos)
    stats = collect_stats(
        ACGModel(weights),
        batches,
        pad_token_id=pad,
        qk=qk,
        pair_candidates=pair_candidates,
        pair_importance=pair_importance,
        progress=progress,
    )
    edges = {
        layer: rank_edges(weights, stats, layer, max_k) for layer in range(weights.layout.n_layers)
    }
    pairs: dict[int, dict[int, RankedPairs]] = {}
    if qk:
        for layer in range(weights.layout.n_layers):
            pairs[layer] = {
                h: rank_pairs(weights, stats, layer, h, max_pairs)
                for h in range(weights.layout.n_heads)
            }
    prices = fit_importance
    if fit_fanin == "adaptive" and fit_ks:  # the same for every k
        prices = feature_prices(weights, batches, fit_importance, pad, progress)
    fitted = {
        k: fit_edges(
            weights,
            edges,
            batches,
            k,
            pool=fit_pool * k,
            fanin=fit_fanin,
            max_fanin=max_fanin,
            importance=prices,
            loss=fit_loss,
            pad_token_id=pad,
            progress=progress,
        )  # fmt: skip
        for k in sorted(set(fit_ks))
    }
    info = {
        "format_version": FORMAT_VERSION,
        "layout": weights.layout.describe(),
        "max_k": max_k,
        "max_pairs": max_pairs if qk else 0,
        "pair_candidates": pair_candidates,
        "pair_importance": pair_importance if qk else None,
        "fit_ks": sorted(fitted),
        "fit_pool": fit_pool,
        "fit_fanin": fit_fanin,
        "max_fanin": max_fanin,
        "fit_importance": fit_importance if fit_fanin == "adaptive" else None,
        "fit_loss": fit_loss,
        "fit_mean_edges": {str(k): round(_mean_edges(layers), 3) for k, layers in fitted.items()},
        "bos_token_id": bos,
        "stats_positions": stats.n_positions,
        "stats_contexts": sum(int(b.shape[0]) for b in batches),
        "build_seconds": round(time.perf_counter() - start, 2),
        "channels": {
            str(i): [c.name for c in weights.layout.channels(i)]
            for i in range(weights.layout.n_layers)
        },
    }
    info.update(meta or {})
    return ACGraph(weights, edges, pairs, stats, info, fitted)


def _mean_edges(layers: dict[int, FittedLayer]) -> float:
    """In-edges per feature over every layer of one set of formulas."""
    used = sum(float(f.used().sum()) for f in layers.values())
    return used / sum(f.weight.shape[0] for f in layers.values())


def load_acg(folder: str | Path, model: Any, transcoders: dict[int, Any]) -> ACGraph:
    """Load a saved graph; ``model`` and ``transcoders`` must be the ones it was built from."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise ArtifactError(f"no ACG at {folder} (missing manifest.json; run `acg build`)")
    meta = read_json(manifest)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest}: unsupported ACG format version")
    weights = ModelWeights(model, transcoders, meta.get("bos_token_id"))
    if weights.layout.describe() != meta.get("layout"):
        raise ArtifactError(
            f"{folder} was built for a different model or transcoder set "
            f"({meta.get('layout')} vs {weights.layout.describe()})"
        )
    t = load_tensors(folder / "edges.safetensors")
    edges = {}
    for layer in range(weights.layout.n_layers):
        channels = weights.layout.channels(layer)
        offsets, off = [], 0
        for c in channels:
            offsets.append(off)
            off += weights.layout.channel_size(c)
        edges[layer] = RankedEdges(
            channels,
            offsets,
            *(t[f"L{layer}.{n}"] for n in ("index", "weight", "mean", "importance", "total_mean")),
        )
    pairs: dict[int, dict[int, RankedPairs]] = {}
    if meta.get("max_pairs"):
        for layer in range(weights.layout.n_layers):
            pairs[layer] = {
                h: RankedPairs(
                    *(
                        t[f"L{layer}H{h}.{n}"]
                        for n in ("q", "k", "weight", "importance", "query_vec", "mean_q")
                    )
                )
                for h in range(weights.layout.n_heads)
            }
    stats = EdgeStats.from_tensors(
        load_tensors(folder / "stats.safetensors"),
        int(meta.get("stats_positions", 0)),
        0,
    )
    fitted = {
        int(k): {
            layer: FittedLayer(
                t.get(f"fit{k}.L{layer}.index", edges[layer].index[:, : int(k)]),
                t[f"fit{k}.L{layer}.weight"],
                t[f"fit{k}.L{layer}.bias"],
                t.get(f"fit{k}.L{layer}.n_edges"),
            )
            for layer in range(weights.layout.n_layers)
        }
        for k in meta.get("fit_ks", [])
    }
    tuned: dict[int, Tuned] = {}
    for key, info in (meta.get("tuned") or {}).items():
        k, n_layers = int(key), weights.layout.n_layers
        layers = {
            i: FittedLayer(
                *(t[f"tune{k}.L{i}.{n}"] for n in ("index", "weight", "bias")),
                t.get(f"tune{k}.L{i}.n_edges"),
            )
            for i in range(n_layers)
        }
        heads: dict[int, dict[int, TunedPairs]] = {}
        if info.get("pairs"):
            heads = {
                i: {
                    h: TunedPairs(t[f"tune{k}.L{i}H{h}.weight"], t[f"tune{k}.L{i}H{h}.query_vec"])
                    for h in range(weights.layout.n_heads)
                }
                for i in range(n_layers)
            }
        tuned[k] = (layers, heads)
    return ACGraph(weights, edges, pairs, stats, meta, fitted, tuned)
