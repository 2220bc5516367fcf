"""acgraph's side of the attribution benchmark (acgraph's venv; one graph per process so the
peak RSS belongs to that graph).

    .venv/bin/python bench/attribution/run_ours.py --data bench/peers/data/attribution \
        --length 64 --out /tmp/ours_64 [--model organism|organism_ctx256] [--batch-size 64]

Writes ``graph.safetensors`` (acgraph's compact form) and ``result.json`` (wall time of
``attribute()``, peak RSS before/after, nodes, edges).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dictionaries"))
from peer_common import peak_rss_mb as rss_mb  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=64, help="attribute()'s default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-save", action="store_true", help="write result.json only (no graph)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from acgraph.attribution import attribute, load_transcoders
    from acgraph.models import load_model

    name = args.model or ("organism" if args.length <= 128 else "organism_ctx256")
    model = load_model(str(args.data / name))
    ts = load_transcoders(args.data / "transcoders", model)
    ids = json.loads((args.data / "prompts.json").read_text())[str(args.length)]
    tokens = torch.tensor(ids)
    attribute(model, ts, tokens[:8], batch_size=args.batch_size)  # warm-up (lazy inits)
    before = rss_mb()
    t0 = time.perf_counter()
    graph = attribute(model, ts, tokens, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    peak = rss_mb()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_save:
        graph.save(args.out / "graph.safetensors")
    result = {
        "tool": "acgraph",
        "model": name,
        "length": args.length,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "n_features": graph.n_features,
        "n_nodes": graph.n_nodes,
        "nnz": graph.nnz,
        "adjacency_mb": graph.memory_bytes() / 2**20,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
