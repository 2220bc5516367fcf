"""What a cleaned graph's attention bounds cost on benign inputs: familiar ones (clean
evaluation prompts) and novel ones (mixed-domain splices, never seen in training).

Top-1 agreement and KL of the bounded ACG against the same ACG without its bounds, and of both
against the original model.

    .venv/bin/python bench/clean/bounds_cost.py --transcoders CLEAN --out X.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.models import load_model
from acgraph.organism import load_config
from acgraph.organism.evaluate import encode
from acgraph.safety.compile import agreement
from acgraph.safety.detect_eval import eval_examples, mixed_domain_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--transcoders", required=True, help="a cleaned folder (with its bounds)")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    cfg = load_config(None if args.model == "organism" else args.model)
    tcs = load_transcoders(args.transcoders)
    bos = model.tokenizer.bos_token_id
    bounded = ACGModel(ModelWeights(model, tcs, bos))
    unbounded = ACGModel(ModelWeights(model, dict(tcs), bos))
    inputs = {
        "clean evaluation prompts (50 per domain)": [
            e.tokens for e in eval_examples(cfg, 50, cfg.seed, False)
        ],
        "mixed-domain splices (100)": mixed_domain_inputs(cfg, 100),
    }
    report = {"model": args.model, "transcoders": args.transcoders}
    for name, seqs in inputs.items():
        toks = [encode(seqs)]
        report[name] = {
            "bounded_vs_unbounded": agreement(unbounded, bounded, toks),
            "bounded_vs_original": agreement(model, bounded, toks),
            "unbounded_vs_original": agreement(model, unbounded, toks),
        }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
