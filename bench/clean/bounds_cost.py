"""What a cleaned graph's attention bounds cost on benign inputs: familiar ones (clean
evaluation prompts) and novel ones (mixed-domain splices, never seen in training; trusted
contexts with random token spans inserted).

Top-1 agreement and KL of the bounded ACG against the same ACG without its bounds, and of both
against the original model.

    .venv/bin/python bench/clean/bounds_cost.py --transcoders CLEAN --out X.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from acgraph.data import load_corpus, tokenize_to_contexts
from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.models import load_model
from acgraph.organism import language, load_config
from acgraph.organism.evaluate import encode
from acgraph.safety.compile import agreement
from acgraph.safety.detect_eval import eval_examples, mixed_domain_inputs


def random_insertions(tokens: torch.Tensor, spans: int, seed: int = 0) -> torch.Tensor:
    """Each row with ``spans`` spans of 1-3 random non-special tokens inserted at random places
    (cut back to its length): benign text in local contexts no training text had."""
    rng = random.Random(seed)
    pool = [i for i, t in enumerate(language.vocabulary()) if not t.startswith("<")]
    rows = []
    for row in tokens.tolist():
        for _ in range(spans):
            at = rng.randrange(1, len(row))
            row = row[:at] + [rng.choice(pool) for _ in range(rng.randint(1, 3))] + row[at:]
        rows.append(row[: tokens.shape[1]])
    return torch.tensor(rows)


@torch.no_grad()
def worst_position_kl(a, b, toks: torch.Tensor) -> list[float]:
    """Per sequence, the largest KL(a || b) over its non-pad positions."""
    la, lb = a(toks).float().log_softmax(-1), b(toks).float().log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1) * (toks != 0)
    return kl.amax(-1).tolist()


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
    texts = load_corpus("organism:trusted", seed=1, max_docs=4000)
    trusted = tokenize_to_contexts(texts, model.tokenizer, 128, max_contexts=100, progress=False)
    batches = {name: encode(seqs) for name, seqs in inputs.items()}
    batches["trusted contexts (100)"] = trusted
    batches["trusted contexts, 1 random span inserted"] = random_insertions(trusted, 1)
    batches["trusted contexts, 4 random spans inserted"] = random_insertions(trusted, 4)
    report = {"model": args.model, "transcoders": args.transcoders}
    for name, batch in batches.items():
        toks = list(batch.split(50))
        worst = torch.tensor([k for t in toks for k in worst_position_kl(unbounded, bounded, t)])
        report[name] = {
            "bounded_vs_unbounded": agreement(unbounded, bounded, toks),
            "bounded_vs_original": agreement(model, bounded, toks),
            "unbounded_vs_original": agreement(model, unbounded, toks),
            "worst_position_kl_unbounded_to_bounded_median": float(worst.median()),
        }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
