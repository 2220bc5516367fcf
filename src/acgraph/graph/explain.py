"""`explain-feature`: a feature's formula in terms of its parents, and how much it explains.

    L2/117 = ( +3.10·L1/40  +2.00·[L0H2 ← tok('(')]  −0.70·L0/9  ... ) / s + bias

Each term is one in-edge: a source (token, position, feature, head output dimension, skip
dimension, const) reached directly or through a channel (``[L0H2 ← x]``: x at the positions head
L0H2 attends to, mixed by its pattern). ``s`` is the layer's norm scale. R² says how much of the
feature's pre-activation variance on data the top-k formula (with the rest at its mean) explains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.errors import ConfigError

from .build import ACGraph


def parse_feature(spec: str) -> tuple[int, int]:
    """``"L2/117"`` or ``"2/117"`` -> (2, 117)."""
    text = spec.strip().upper().removeprefix("L")
    layer, sep, fid = text.partition("/")
    if not sep or not layer.isdigit() or not fid.isdigit():
        raise ConfigError(f"feature must look like L2/117 (layer/id), got {spec!r}")
    return int(layer), int(fid)


def _token_strings(model: Any) -> list[str] | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    return tok.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))


@torch.no_grad()
def explain_feature(
    graph: ACGraph,
    layer: int,
    feature: int,
    *,
    k: int = 8,
    batches: list[Tensor] | None = None,
    r2_ks: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
) -> dict[str, Any]:
    layout = graph.layout
    if not 0 <= layer < layout.n_layers:
        raise ConfigError(f"layer {layer} is not in the graph (layers 0..{layout.n_layers - 1})")
    if not 0 <= feature < layout.d_sae[layer]:
        raise ConfigError(f"layer {layer} has features 0..{layout.d_sae[layer] - 1}, not {feature}")
    ranked = graph.edges[layer]
    k = max(1, min(k, ranked.max_k))
    tokens = _token_strings(graph.weights.model)
    bias = float(graph.weights.target_bias(layer)[feature])
    terms = []
    for r in range(ranked.max_k):
        c, slot = ranked.channel_of(int(ranked.index[feature, r]))
        channel = ranked.channels[c]
        source = layout.source_label(channel.read_site, slot, tokens)
        label = source if channel.kind == "direct" else f"[{channel.name} ← {source}]"
        terms.append(
            {
                "source": label,
                "channel": channel.name,
                "weight": float(ranked.weight[feature, r]),
                "mean_contribution": float(ranked.mean[feature, r]),
                "score": float(ranked.importance[feature, r]),
                "_c": c,
                "_slot": slot,
            }
        )
    fold = float(ranked.total_mean[feature] - ranked.mean[feature, :k].sum())
    out: dict[str, Any] = {
        "feature": f"L{layer}/{feature}",
        "bias": bias,
        "folded_mean": fold,
        "terms": [{kk: v for kk, v in t.items() if not kk.startswith("_")} for t in terms[:k]],
    }
    out["formula"] = format_formula(out)
    if batches:
        out["r2"] = _r2(
            graph, layer, feature, terms, batches, [x for x in r2_ks if x <= ranked.max_k]
        )
    return out


def format_formula(info: dict[str, Any]) -> str:
    parts = []
    for t in info["terms"]:
        sign = "−" if t["weight"] < 0 else "+"
        parts.append(f"{sign}{abs(t['weight']):.2f}·{t['source']}")
    return (
        f"{info['feature']} = ( {'  '.join(parts)}  ... ) / s  "
        f"{info['bias'] + info['folded_mean']:+.2f}"
    )


def _r2(graph: ACGraph, layer: int, feature: int, terms: list[dict], batches, ks) -> dict:
    acg = graph.model()
    ranked = graph.edges[layer]
    pad = getattr(getattr(graph.weights.model, "tokenizer", None), "pad_token_id", None)
    bias = graph.weights.target_bias(layer)[feature]
    sse = {k: 0.0 for k in ks}
    true_all = []
    for tokens in batches:
        trace = acg.run(tokens, until=layer)
        mask = valid_positions(trace.tokens, pad)
        s = trace.s2[layer]
        contribs = []
        for t in terms[: max(ks)]:
            channel = ranked.channels[t["_c"]]
            g = acg.gated(trace, channel, torch.tensor([t["_slot"]]))[..., 0]
            contribs.append(t["weight"] * g / s)
        stacked = torch.stack(contribs, -1)
        true = trace.pre[layer][..., feature]
        for k in ks:
            fold = ranked.total_mean[feature] - ranked.mean[feature, :k].sum()
            pred = stacked[..., :k].sum(-1) + bias + fold
            sse[k] += float(((true - pred)[mask] ** 2).double().sum())
        true_all.append(true[mask].double())
    true_cat = torch.cat(true_all)
    var = float(((true_cat - true_cat.mean()) ** 2).sum())
    return {str(k): (1 - sse[k] / var) if var > 0 else float("nan") for k in ks}
