"""Neuronpedia / circuit-tracer graph JSON (the schema circuit-tracer's local viewer serves).

A pruned graph is written as ``<slug>.json`` (``metadata``, ``qParams``, ``nodes``, ``links``)
and registered in ``graph-metadata.json`` beside it, so the folder can be served as is by
``circuit_tracer.frontend.local_server.serve(data_dir=folder)``. Labels (``clerp``) of features
are left empty. Node ids follow circuit-tracer: features ``{layer}_{feature}_{pos}``, errors
``0_{layer}_{pos}``, tokens ``E_{token id}_{pos}``, targets ``{n_layers+1}_{id}_{pos}`` (custom
targets get virtual ids ``vocab_size + index``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from acgraph.errors import ConfigError
from acgraph.io import atomic_write_json, atomic_write_text

from .graph import AttributionGraph
from .prune import PruneResult, prune


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(graph: AttributionGraph, i: int, influence: float, vocab_size: int) -> dict[str, Any]:
    kind = graph.node_kind(i)
    layer, pos = graph.node_layer_pos(i)
    base = {
        "ctx_idx": pos,
        "influence": influence,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "clerp": "",
    }
    if kind == "feature":
        f = int(graph.feat_idx[i])
        return {
            **base,
            "node_id": f"{layer}_{f}_{pos}",
            "feature": _cantor(layer, f),
            "layer": str(layer),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{f}-0",
            "activation": float(graph.feat_act[i]),
        }
    if kind == "error":
        return {
            **base,
            "node_id": f"0_{layer}_{pos}",
            "feature": -1,
            "layer": str(layer),
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"{layer}_{pos}-0",
            "activation": None,
        }
    if kind == "token":
        tok = int(graph.tokens[pos])
        return {
            **base,
            "node_id": f"E_{tok}_{pos}",
            "feature": pos,
            "layer": "E",
            "feature_type": "embedding",
            "jsNodeId": f"E_{tok}-{pos}",
            "activation": None,
        }
    k = i - graph.target_start
    t = graph.targets[k]
    vid = t.vocab_idx if t.kind == "logit" else vocab_size + k
    top = str(graph.n_layers + 1)
    return {
        **base,
        "node_id": f"{top}_{vid}_{pos}",
        "feature": vid,
        "layer": top,
        "feature_type": "logit",
        "token_prob": float(t.weight),
        "is_target_logit": k == 0,
        "jsNodeId": f"L_{vid}-{pos}",
        "clerp": f'Output "{t.label}" (p={t.weight:.3f})',
        "influence": None,
        "activation": None,
    }


def qk_story_json(story: Any, graph: AttributionGraph, top: int = 10) -> dict[str, Any]:
    """One head's QK story as JSON: the score, its exact decomposition's largest query x key
    node pairs, the largest query-side and key-side totals, and the bias terms. Nodes carry
    the graph JSON's ``node_id`` and a readable label."""
    vocab = int(graph.meta.get("vocab_size", 0)) or int(graph.tokens.max()) + 1

    def ref(i: int) -> dict[str, str]:
        return {"node_id": _node(graph, i, 0.0, vocab)["node_id"], "label": graph.describe(i)}

    def side(nodes: Any, terms: Any) -> list[dict[str, Any]]:
        order = terms.abs().argsort(descending=True)[:top].tolist()
        return [{**ref(int(nodes[j])), "value": float(terms[j])} for j in order]

    return {
        "layer": story.layer,
        "head": story.head,
        "query_pos": story.query_pos,
        "key_pos": story.key_pos,
        "score": story.score,
        "pattern": story.pattern,
        "sum_of_terms": story.total,
        "top_pairs": [
            {"query": ref(q), "key": ref(k), "value": v} for q, k, v in story.top_pairs(top)
        ],
        "query_terms": side(story.query_nodes, story.query_terms()),
        "key_terms": side(story.key_nodes, story.key_terms()),
        "bias_bias": story.bias_bias,
    }


def graph_json(
    graph: AttributionGraph,
    slug: str,
    *,
    result: PruneResult | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The viewer's JSON object for the pruned ``graph``."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", slug):
        raise ConfigError(f"slug {slug!r} may only use letters, digits, '_', '-' and '.'")
    res = result or prune(graph, node_threshold, edge_threshold)
    vocab = vocab_size or int(graph.meta.get("vocab_size", 0)) or int(graph.tokens.max()) + 1
    kept = res.node_mask.nonzero()[:, 0].tolist()
    nodes = {i: _node(graph, i, float(res.cumulative_scores[i]), vocab) for i in kept}
    links = []
    rows = torch_rows(graph)
    sel = res.edge_mask.nonzero()[:, 0]
    for e in sel.tolist():
        r, c = int(rows[e]), int(graph.col[e])
        if r in nodes and c in nodes:
            links.append(
                {
                    "source": nodes[c]["node_id"],
                    "target": nodes[r]["node_id"],
                    "weight": float(graph.val[e]),
                }
            )
    used = {x for link in links for x in (link["source"], link["target"])}
    out_nodes = [
        n
        for n in nodes.values()
        if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")
    ]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan or str(graph.meta.get("transcoders", "acgraph")),
            "transcoder_list": [],
            "prompt_tokens": graph.token_strings,
            "prompt": "".join(graph.token_strings),
            "node_threshold": node_threshold,
            "schema_version": 1,
            "info": {
                "generator": "acgraph",
                "model": graph.meta.get("model"),
                "edge_threshold": edge_threshold,
            },
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": out_nodes,
        "links": links,
    }


def torch_rows(graph: AttributionGraph):
    import torch

    return torch.repeat_interleave(torch.arange(graph.n_nodes), graph.crow.diff())


def write_graph_json(folder: str | Path, data: dict[str, Any]) -> Path:
    """Write ``<slug>.json`` and register it in ``graph-metadata.json`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slug = data["metadata"]["slug"]
    path = atomic_write_text(folder / f"{slug}.json", json.dumps(data, separators=(",", ":")))
    index_path = folder / "graph-metadata.json"
    index = {"graphs": []}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError:
            index = {"graphs": []}
    meta = {k: v for k, v in data["metadata"].items() if k != "info"}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [meta]
    atomic_write_json(index_path, index)
    return path
