"""Compare one prompt's graphs from both tools (acgraph's venv).

    .venv/bin/python bench/attribution/compare.py --ours /tmp/ours_64 --ct /tmp/ct_64

Checks the node sets are identical (active features, activations, logit targets) and compares
every unpruned edge: acgraph's stored (structurally possible) edges against circuit-tracer's
dense matrix at the same (row, column), and circuit-tracer's entries outside that structure
(which must be zero). Also compares pruning (node masks at 0.8/0.98) and the two scores.
Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from acgraph.attribution import AttributionGraph
from acgraph.attribution.prune import graph_scores, prune

RTOL = 1e-4


def compare(ours_dir: Path, ct_dir: Path) -> dict:
    g = AttributionGraph.load(ours_dir / "graph.safetensors")
    ct = load_file(str(ct_dir / "graph.safetensors"))
    A = ct["adjacency"]
    feats = torch.stack([g.feat_layer, g.feat_pos, g.feat_idx], 1)
    same_nodes = (
        torch.equal(feats, ct["active_features"].long())
        and torch.equal(ct["logit_ids"], torch.tensor([t.vocab_idx for t in g.targets]))
        and A.shape[0] == g.n_nodes
        and torch.equal(ct["input_tokens"].long(), g.tokens)
    )
    out: dict = {"same_node_sets": bool(same_nodes), "n_nodes": g.n_nodes, "nnz": g.nnz}
    if not same_nodes:
        return out
    out["max_activation_diff"] = float((g.feat_act - ct["activation_values"]).abs().max())
    worst_row_rel = 0.0
    worst_abs = 0.0
    n_bad = 0
    stored = torch.zeros(A.shape[0], dtype=torch.long)  # count of our edges per row
    outside_max = 0.0
    for r0, r1, rows in g.row_chunks():
        lo, hi = int(g.crow[r0]), int(g.crow[r1])
        cols = g.col[lo:hi].long()
        ours = g.val[lo:hi]
        theirs = A[rows, cols]
        diff = (ours - theirs).abs()
        # row scale: the largest |edge| into that target (circuit-tracer's values)
        row_max = torch.zeros(A.shape[0]).scatter_reduce_(0, rows, theirs.abs(), "amax")
        scale = row_max[rows].clamp(min=1e-12)
        worst_row_rel = max(worst_row_rel, float((diff / scale).max()) if diff.numel() else 0.0)
        worst_abs = max(worst_abs, float(diff.max()) if diff.numel() else 0.0)
        n_bad += int((diff > RTOL * theirs.abs() + RTOL * 1e-2 * scale).sum())
        stored += torch.bincount(rows, minlength=A.shape[0])
        # entries circuit-tracer has outside our stored structure
        sub = A[r0:r1].clone()
        sub[rows - r0, cols] = 0
        outside_max = max(outside_max, float(sub.abs().max()) if sub.numel() else 0.0)
    # rows we do not store at all (error and token rows) must be empty in circuit-tracer too
    empty = A[g.error_start : g.target_start].abs().max()
    out.update(
        {
            "max_abs_diff": worst_abs,
            "max_row_relative_diff": worst_row_rel,
            "edges_outside_rtol": n_bad,
            "rtol": RTOL,
            "max_abs_outside_our_structure": max(outside_max, float(empty)),
            "ct_nonzero_edges": int((A != 0).sum()),
        }
    )
    # pruning and scores: our sparse implementation vs circuit-tracer's rules on its matrix
    res = prune(g)
    out["pruned_nodes"] = res.n_nodes
    out["pruned_edges"] = res.n_edges
    if "node_mask" in ct:
        out["same_pruned_nodes_as_circuit_tracer"] = bool(
            torch.equal(res.node_mask, ct["node_mask"].bool())
        )
    from acgraph.attribution.export import graph_json

    blob = json.dumps(graph_json(g, "bench", result=res), separators=(",", ":"))
    out["pruned_json_bytes"] = len(blob.encode())
    out["compact_safetensors_bytes"] = (ours_dir / "graph.safetensors").stat().st_size
    rep, comp = graph_scores(g)
    out["replacement_score"] = rep
    out["completeness_score"] = comp
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ours", type=Path, required=True)
    p.add_argument("--ct", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(compare(args.ours, args.ct), indent=2))


if __name__ == "__main__":
    main()
