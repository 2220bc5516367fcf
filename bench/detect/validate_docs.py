"""How many trusted documents the fit needs, chosen on the validation stream (eval seed +202).

    .venv/bin/python bench/detect/validate_docs.py organism organism
    .venv/bin/python bench/detect/validate_docs.py VARIANT_DIR TC_DIR     # a trained variant

Fits every detector on 256 and on 1024 trusted documents and prints AUROC and TPR at 1% FPR of
every unsupervised detector on 200 triggered vs 200 clean validation inputs.
"""

from __future__ import annotations

import argparse

import torch

from acgraph.graph import load_transcoders
from acgraph.models import load_model
from acgraph.organism import load_config
from acgraph.organism.evaluate import encode
from acgraph.safety import detect as D
from acgraph.safety.detect_eval import eval_examples, trusted_batches


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="'organism' or a folder written by `acg organism train`")
    p.add_argument("transcoders", help="'organism' or a transcoder folder")
    p.add_argument("--docs", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tcs = load_model(args.model), load_transcoders(args.transcoders)
    cfg = load_config(None if args.model == "organism" else args.model)
    seed = cfg.seed + 202
    pos = encode([e.tokens for e in eval_examples(cfg, 50, seed, True)])
    neg = encode([e.tokens for e in eval_examples(cfg, 50, seed, False)])
    for docs in args.docs:
        batches = trusted_batches(docs, seed=0, config=cfg)
        det = D.fit_detectors(model, tcs, batches, progress=False)
        sp, sn = det.score(pos), det.score(neg)
        for name in sp:
            auc, tpr = D.auroc(sn[name], sp[name]), D.tpr_at_fpr(sn[name], sp[name])
            print(f"docs {docs:>5}  {name:<15} AUROC {auc:.4f}  TPR@1% {tpr:.3f}", flush=True)


if __name__ == "__main__":
    main()
