"""`acg attribute`: the local attribution graph of one prompt (thin over acgraph.attribution).

acg attribute --model organism --transcoders organism --prompt "c 4 ; a 9 ; a ?" --out DIR
acg attribute ... --qk 2 0 11 5          # QK story of layer 2 head 0, query 11 -> key 5
acg attribute ... --intervene 2:114:11:0 # set feature 114 of layer 2 at position 11 to 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from acgraph.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attribute",
        help="local attribution graph of one prompt (Neuronpedia/circuit-tracer JSON)",
        description="Build the exact attribution graph of a prompt under frozen attention and "
        "norm scales, prune it by influence, and write DIR/<slug>.json (+ graph-metadata.json, "
        "servable by circuit-tracer's viewer) and DIR/<slug>.safetensors (unpruned, compact).",
    )
    p.add_argument("--model", metavar="SPEC", help="model spec (default: the workspace's)")
    p.add_argument("--workspace", metavar="WS", help="use this workspace (model, graphs/)")
    p.add_argument(
        "--transcoders",
        required=True,
        metavar="DIR",
        help="'organism', a circuit-tracer set folder, or a folder of SAELens-layout folders",
    )
    p.add_argument("--prompt", required=True, help="prompt text (BOS is prepended)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: WS/graphs)")
    p.add_argument("--slug", default=None, help="graph name (default: from the prompt)")
    p.add_argument(
        "--target",
        nargs="+",
        metavar="TOKEN",
        help="logit targets (default: top logits to --logit-prob, at most --max-logits)",
    )
    p.add_argument(
        "--logit-diff", nargs=2, metavar=("POS", "NEG"), help="target logit(POS) - logit(NEG)"
    )
    p.add_argument("--max-logits", type=int, default=10)
    p.add_argument("--logit-prob", type=float, default=0.95)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="backward rows per batch (default 64: on CPU faster and lighter than 256 at every "
        "prompt length measured; larger batches may suit a GPU)",
    )
    p.add_argument(
        "--qk",
        nargs=4,
        type=int,
        action="append",
        metavar=("LAYER", "HEAD", "Q", "K"),
        help="print the exact QK decomposition of a head's score (repeatable)",
    )
    p.add_argument(
        "--intervene",
        action="append",
        metavar="L:F:POS:VALUE",
        help="set feature F of layer L at position POS (or '*') to VALUE, or scale "
        "it with xVALUE; prints the logit changes (repeatable)",
    )
    p.add_argument(
        "--constrained",
        action="store_true",
        help="interventions act through the frozen local model in all layers",
    )
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also generate N tokens under the interventions",
    )
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_attribute)


def _parse_intervention(text: str):
    from acgraph.attribution.interventions import Intervention

    parts = text.split(":")
    if len(parts) != 4:
        raise ConfigError(f"--intervene takes L:F:POS:VALUE, got {text!r}")
    try:
        layer, feature = int(parts[0]), int(parts[1])
        positions = None if parts[2] == "*" else (int(parts[2]),)
        mode = "scale" if parts[3].startswith("x") else "set"
        value = float(parts[3].lstrip("x"))
    except ValueError:
        raise ConfigError(f"--intervene takes L:F:POS:VALUE, got {text!r}") from None
    return Intervention(layer, feature, value, mode, positions)


def _attribute(args: argparse.Namespace) -> int:
    import torch

    from acgraph.attribution import LogitDiffSpec, LogitSpec, attribute, load_transcoders
    from acgraph.attribution.export import graph_json, write_graph_json
    from acgraph.attribution.prune import graph_scores, prune
    from acgraph.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    ws = None
    if args.workspace:
        from acgraph.workspace import Workspace

        ws = Workspace.open(args.workspace)
    spec = args.model or (ws.model if ws else None)
    if not spec:
        raise ConfigError("give --model or --workspace")
    out = Path(args.out) if args.out else (ws.graphs_dir if ws else None)
    if out is None:
        raise ConfigError("give --out or --workspace")
    model = load_model(spec)
    ts = load_transcoders(args.transcoders, model)
    targets = None
    if args.target:
        targets = [LogitSpec(_token(t)) for t in args.target]
    if args.logit_diff:
        targets = (targets or []) + [LogitDiffSpec(*(_token(t) for t in args.logit_diff))]
    graph = attribute(
        model,
        ts,
        args.prompt,
        targets=targets,
        max_n_logits=args.max_logits,
        desired_logit_prob=args.logit_prob,
        batch_size=args.batch_size,
        verbose=True,
    )
    graph.meta["vocab_size"] = model.cfg.d_vocab
    slug = args.slug or _slug(args.prompt)
    res = prune(graph, args.node_threshold, args.edge_threshold)
    data = graph_json(
        graph,
        slug,
        result=res,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        vocab_size=model.cfg.d_vocab,
    )
    stories = []
    if args.qk:
        from acgraph.attribution.attention import context, qk_story
        from acgraph.attribution.export import qk_story_json

        ctx = context(model, ts, graph)
        stories = [qk_story(ctx, layer, head, q, k) for layer, head, q, k in args.qk]
        data["qk_stories"] = [qk_story_json(s, graph) for s in stories]
    json_path = write_graph_json(out, data)
    st_path = graph.save(out / f"{slug}.safetensors")
    replacement, completeness = graph_scores(graph)
    summary = {
        "tokens": graph.n_pos,
        "features": graph.n_features,
        "nodes": graph.n_nodes,
        "edges": graph.nnz,
        "pruned_nodes": len(data["nodes"]),
        "pruned_edges": len(data["links"]),
        "replacement_score": round(replacement, 4),
        "completeness_score": round(completeness, 4),
        "targets": [(t.label, round(t.weight, 4)) for t in graph.targets],
        "seconds": round(graph.meta["seconds"], 3),
        "json": str(json_path),
        "json_bytes": json_path.stat().st_size,
        "safetensors": str(st_path),
        "safetensors_bytes": st_path.stat().st_size,
    }
    print(json.dumps(summary, indent=2))
    for s in stories:
        print(
            f"QK L{s.layer}.H{s.head} {s.query_pos}->{s.key_pos}: score {s.score:.4f} = sum of "
            f"terms {s.total:.4f} (pattern {s.pattern:.3f}); bias x bias {s.bias_bias:.4f}"
        )
        for qn, kn, v in s.top_pairs(5):
            print(f"  {graph.describe(qn):>22} x {graph.describe(kn):<22} {v:+.4f}")
    if args.intervene:
        from acgraph.attribution.interventions import generate, intervene

        ivs = [_parse_intervention(t) for t in args.intervene]
        r = intervene(
            model,
            ts,
            graph.tokens,
            ivs,
            constrained_layers=range(model.cfg.n_layers) if args.constrained else None,
        )
        for tok, p0, p1, dl in r.top_changes(5):
            print(f"  {model.to_string([tok])!r:>10} p {p0:.4f} -> {p1:.4f} (logit {dl:+.4f})")
        if args.generate:
            ids = generate(model, ts, graph.tokens, ivs, max_new_tokens=args.generate)
            print("  generated:", model.to_string(ids[graph.n_pos :].tolist()))
    elif args.generate:
        from acgraph.attribution.interventions import generate

        ids = generate(model, ts, graph.tokens, (), max_new_tokens=args.generate)
        print("  generated:", model.to_string(ids[graph.n_pos :].tolist()))
    return 0


def _token(text: str) -> int | str:
    return int(text) if text.isdigit() and len(text) > 3 else text


def _slug(prompt: str) -> str:
    import hashlib
    import re

    words = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:40] or "graph"
    return f"{words}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"
