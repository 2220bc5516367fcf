"""How the graph build's phases grow with depth: edge statistics, edge ranking and one fitted k,
timed for the first N layers of a model (library calls, the same as `acg build`).

    .venv/bin/python bench/graph/build_scaling.py --transcoders TC --corpus DIR \
        --layers 6 12 18 --contexts 8 --label after \
        --out bench/results/graph_build_scaling_smollm2.json

Timings do not depend on how well the transcoders are trained (TopK fixes every feature count),
so a quickly trained set serves. Each (label, layers) entry of --out is replaced, others kept, so
a run of another checkout (PYTHONPATH=OLD/src ... --label old) lands beside this one.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from acgraph.cli.graph import _batches
from acgraph.graph import load_transcoders
from acgraph.graph.forward import ACGModel
from acgraph.graph.prune import rank_edges
from acgraph.graph.refit import fit_edges
from acgraph.graph.stats import collect_stats
from acgraph.graph.weights import ModelWeights
from acgraph.io import atomic_write_json
from acgraph.models import load_model


def phases(model, transcoders, batches, n_layers: int, max_k: int, fit_k: int) -> dict:
    tcs = {layer: tc for layer, tc in transcoders.items() if layer < n_layers}
    pad = model.tokenizer.pad_token_id
    weights = ModelWeights(model, tcs, model.tokenizer.bos_token_id)
    t0 = time.perf_counter()
    stats = collect_stats(ACGModel(weights), batches, pad_token_id=pad, qk=False, progress=False)
    t1 = time.perf_counter()
    edges = {layer: rank_edges(weights, stats, layer, max_k) for layer in range(n_layers)}
    t2 = time.perf_counter()
    fit_edges(weights, edges, batches, fit_k, pool=4 * fit_k, pad_token_id=pad, progress=False)
    t3 = time.perf_counter()
    return {
        "stats_s": round(t1 - t0, 1),
        "rank_s": round(t2 - t1, 1),
        "fit_s": round(t3 - t2, 1),
        "total_s": round(t3 - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--transcoders", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--max-k", type=int, default=256)
    p.add_argument("--fit-k", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="current")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    transcoders = load_transcoders(args.transcoders)
    batches = _batches(model, args.corpus, args.contexts, 128, 0, 8)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    report["command"] = "see the module docstring of bench/graph/build_scaling.py"
    for n in args.layers:
        got = phases(model, transcoders, batches, n, args.max_k, args.fit_k)
        got.update(
            label=args.label,
            layers=n,
            contexts=args.contexts,
            threads=args.threads,
            max_k=args.max_k,
            fit_k=args.fit_k,
            peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        )
        print(json.dumps(got), flush=True)
        report["runs"] = [
            r for r in report["runs"] if (r["label"], r["layers"]) != (args.label, n)
        ] + [got]
        atomic_write_json(out, report)


if __name__ == "__main__":
    main()
