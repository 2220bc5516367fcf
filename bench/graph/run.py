"""Throughput and peak memory of the runnable ACG vs the original forward pass (CPU).

    .venv/bin/python bench/graph/run.py --acg DIR --out bench/results/graph_organism.json

DIR is an ACG built with `acg build` (or `make demo`'s demo_out/acg). Every configuration runs in
its own subprocess (so peak RSS is its own), on the same held-out organism contexts: the original
HookedTransformer, level 1 (all edges, dense encoders on the graph residual), level 2 with k
in-edges per feature, level 3 (plus QK from the top pairs). Tokens/s is the best of --repeats
timed passes after one warm-up; peak RSS is the process maximum (ru_maxrss) minus the RSS before
the first forward pass (model, graph and inputs loaded).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ["original", "level1", "k4", "k16", "k64", "k16+pairs", "k64+pairs"]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from acgraph.data import tokenize_to_contexts
    from acgraph.graph import load_acg, load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import generate_texts

    model = load_model("organism")
    texts = generate_texts(args.contexts * 12, seed=5, split="poisoned")
    tokens = tokenize_to_contexts(
        texts, model.tokenizer, 128, max_contexts=args.contexts, progress=False
    )
    graph = load_acg(args.acg, model, load_transcoders("organism"))
    name = args.one
    pairs = int(graph.meta["max_pairs"]) if name.endswith("+pairs") else None
    if name == "original":
        fn = model
    elif name == "level1":
        fn = graph.model()
    else:
        fn = graph.model(int(name[1:].split("+")[0]), pairs)
    batches = list(tokens.split(args.batch_size))
    base = _rss_mb()
    with torch.no_grad():
        fn(batches[0])
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_tok = tokens.numel()
    return {
        "config": name,
        "tokens": n_tok,
        "seconds": best,
        "tokens_per_s": n_tok / best,
        "peak_rss_mb": peak,
        "peak_over_base_mb": peak - base,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--acg", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--acg",
            args.acg,
            "--threads",
            str(args.threads),
            "--contexts",
            str(args.contexts),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name:<11} {row['tokens_per_s']:>9.0f} tok/s  peak RSS {row['peak_rss_mb']:.0f} MB "
            f"(+{row['peak_over_base_mb']:.0f} MB over loaded)",
            flush=True,
        )
    orig = rows[0]
    for r in rows:
        r["speed_vs_original"] = r["tokens_per_s"] / orig["tokens_per_s"]
        r["peak_rss_vs_original"] = r["peak_rss_mb"] / orig["peak_rss_mb"]
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "contexts": args.contexts,
        "context_size": 128,
        "batch_size": args.batch_size,
        "acg": str(Path(args.acg)),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
