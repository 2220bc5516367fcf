"""Attribution benchmark driver: acgraph vs circuit-tracer on the organism (acgraph's venv).

    .venv/bin/python bench/attribution/make_inputs.py
    .venv/bin/python bench/attribution/run.py --lengths 16 64 128 256 --repeats 3 \
        --out bench/results/attribution_organism.json

Each graph is built in a fresh process per tool (one thread each, ``torch.set_num_threads(1)``),
``--repeats`` times; the fastest wall time and the peak RSS of that run are kept. Edge agreement,
node sets, pruning and scores come from ``compare.py`` on the first run's graphs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CT_PY = ROOT / "bench/peers/circuit_tracer/bin/python"


def run(cmds: dict[str, list[str]], parallel: bool) -> dict[str, dict]:
    """Each tool's result line; ``parallel``: both processes at once (one thread each)."""

    def start(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, cwd=ROOT)

    def finish(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate()
        if proc.returncode != 0:
            return {"error": err.strip().splitlines()[-3:]}
        return json.loads(out.strip().splitlines()[-1])

    if parallel:
        procs = {name: start(cmd) for name, cmd in cmds.items()}
        return {name: finish(proc) for name, proc in procs.items()}
    return {name: finish(start(cmd)) for name, cmd in cmds.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=ROOT / "bench/peers/data/attribution")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/acg_attr_bench"))
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/attribution_organism.json")
    p.add_argument("--ct-prune-max-length", type=int, default=128)
    p.add_argument(
        "--model",
        default=None,
        help="model folder under --data (default: organism, organism_ctx256 past 128 tokens)",
    )
    p.add_argument(
        "--parallel",
        action="store_true",
        help="run the two tools at the same time (one thread each, on a 2-core machine)",
    )
    p.add_argument("--skip-ct-above", type=int, default=None, help="circuit-tracer up to N tokens")
    p.add_argument(
        "--compare-only", action="store_true", help="redo the comparisons of an existing --out"
    )
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from compare import compare

    if args.compare_only:
        data = json.loads(args.out.read_text())
        for row in data["rows"]:
            n = row["length"]
            row["agreement"] = compare(args.work / f"ours_{n}_0", args.work / f"ct_{n}_0")
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        return

    model_arg = ["--model", args.model] if args.model else []
    rows = []
    for n in args.lengths:
        runs: dict[str, list[dict]] = {"acgraph": [], "circuit-tracer": []}
        for rep in range(args.repeats):
            ours_dir = args.work / f"ours_{n}_{rep}"
            ct_dir = args.work / f"ct_{n}_{rep}"
            cmds = {
                "acgraph": [
                    sys.executable,
                    str(HERE / "run_ours.py"),
                    "--data",
                    str(args.data),
                    "--length",
                    str(n),
                    "--out",
                    str(ours_dir),
                    *model_arg,
                ]
            }
            ct_cmd = [
                str(CT_PY),
                str(HERE / "run_ct.py"),
                "--data",
                str(args.data),
                "--length",
                str(n),
                "--out",
                str(ct_dir),
                *model_arg,
            ]
            if n > args.ct_prune_max_length or rep > 0:
                ct_cmd.append("--no-prune")
            if args.skip_ct_above is None or n <= args.skip_ct_above:
                cmds["circuit-tracer"] = ct_cmd
            results = run(cmds, args.parallel)
            runs["acgraph"].append(results["acgraph"])
            runs["circuit-tracer"].append(
                results.get("circuit-tracer", {"skipped": f"longer than {args.skip_ct_above}"})
            )
            print(n, rep, {k: v[-1].get("seconds") for k, v in runs.items()}, flush=True)
        best = {
            k: min((r for r in v if "seconds" in r), key=lambda r: r["seconds"], default=v[0])
            for k, v in runs.items()
        }
        row = {
            "length": n,
            "acgraph": best["acgraph"],
            "circuit_tracer": best["circuit-tracer"],
            "all_seconds": {k: [r.get("seconds") for r in v] for k, v in runs.items()},
            "all_peak_rss_mb": {k: [r.get("peak_rss_mb") for r in v] for k, v in runs.items()},
        }
        if "seconds" in best["acgraph"] and "seconds" in best["circuit-tracer"]:
            a, c = best["acgraph"], best["circuit-tracer"]
            row["speedup"] = c["seconds"] / a["seconds"]
            row["peak_rss_ratio"] = a["peak_rss_mb"] / c["peak_rss_mb"]
            row["rss_increase_ratio"] = (a["peak_rss_mb"] - a["rss_before_mb"]) / max(
                c["peak_rss_mb"] - c["rss_before_mb"], 1e-9
            )
            row["agreement"] = compare(args.work / f"ours_{n}_0", args.work / f"ct_{n}_0")
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "benchmark": "attribution",
                    "model": args.model or "organism",
                    "parallel": args.parallel,
                    "date": time.strftime("%Y-%m-%d"),
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
    print(
        json.dumps([{k: r.get(k) for k in ("length", "speedup", "peak_rss_ratio")} for r in rows])
    )


if __name__ == "__main__":
    main()
