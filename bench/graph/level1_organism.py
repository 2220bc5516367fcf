"""Level 1 of the organism's ACG (every MLP replaced by its transcoder, no error terms) on the
held-out text and prompts `acg faithfulness` uses, without building a graph: for comparing
transcoder sets (e.g. fine-tuning settings) before paying for a build.

    .venv/bin/python bench/graph/level1_organism.py TC [TC ...] --per-domain 500 --out FILE.json

Held-out text: 32 contexts of 128 tokens of organism:poisoned, seed 1 (the build's seed 0 + 1).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from acgraph.cli.graph import _batches
from acgraph.dictionaries.metrics import AgreementSums
from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.graph.faithfulness import organism_scores
from acgraph.io import atomic_write_json
from acgraph.models import load_model
from acgraph.organism import load_config


@torch.no_grad()
def level1(model, transcoders: str, batches, per_domain: int) -> dict:
    acg = ACGModel(ModelWeights(model, load_transcoders(transcoders), model.tokenizer.bos_token_id))
    sums, pad = AgreementSums(), model.tokenizer.pad_token_id
    for tokens in batches:
        targets = tokens[:, 1:]
        mask = targets != pad if pad is not None else torch.ones_like(targets, dtype=torch.bool)
        clean_logp = F.log_softmax(model(tokens)[:, :-1].double(), -1)
        sums.update(acg(tokens), clean_logp, targets, mask)
    r = sums.result()
    keep = ("ce", "kl", "top1_agreement", "top1_agreement_confident")
    return {"transcoders": transcoders, **{k: r[k] for k in keep},
            "organism": organism_scores(acg, load_config(), per_domain)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transcoders", nargs="+")
    p.add_argument("--per-domain", type=int, default=500)
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("organism")
    batches = _batches(model, "organism:poisoned", args.contexts, 128, 1, 16)
    rows = [level1(model, tc, batches, args.per_domain) for tc in args.transcoders]
    for row in rows:
        print(json.dumps(row))
    atomic_write_json(args.out, {"contexts": args.contexts, "rows": rows})


if __name__ == "__main__":
    main()
