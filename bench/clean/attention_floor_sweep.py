"""How the attention bounds of `acg clean` depend on their two settings: the floor any token
pair may reach, how much trusted text the peaks are measured on (token-pair coverage), which
token pair keys them, and whether they cap or mask.

Takes a cleaned transcoder folder, measures the peaks through its ACG (without any bounds it
stores) on N trusted contexts, and scores the organism for each floor. Only the evaluation
reads the trigger; the bounds see trusted text alone.

    .venv/bin/python bench/clean/attention_floor_sweep.py --transcoders CLEAN \
        --kinds key-bigram,query-key --modes cap,mask --contexts 256,2048 --floors 0,0.1,0.25 \
        --out X.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from acgraph.data import load_corpus, tokenize_to_contexts
from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.graph.attention_bounds import attention_peaks
from acgraph.models import load_model
from acgraph.organism import load_config
from acgraph.organism.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="organism", help="organism, or a trained organism folder")
    p.add_argument("--transcoders", required=True)
    p.add_argument("--contexts", default="256,2048")
    p.add_argument("--floors", default="0,0.1,0.2,0.25,0.3,0.5")
    p.add_argument("--kinds", default="key-bigram,query-key")
    p.add_argument("--modes", default="cap")
    p.add_argument("--per-domain", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    cfg = load_config(None if args.model == "organism" else args.model)
    tcs = dict(load_transcoders(args.transcoders))  # a plain dict: no stored bounds
    bos = model.tokenizer.bos_token_id
    plain = ACGModel(ModelWeights(model, tcs, bos))
    rows = []
    runs = [(k, int(c)) for k in args.kinds.split(",") for c in args.contexts.split(",")]
    for kind, n in runs:
        texts = load_corpus("organism:trusted", seed=0, max_docs=n * 40)
        toks = tokenize_to_contexts(texts, model.tokenizer, 128, max_contexts=n, progress=False)
        t0 = time.perf_counter()
        batches = list(toks.split(16))
        peaks = attention_peaks(plain, batches, 0.0, model.tokenizer.pad_token_id, kind)
        seconds = time.perf_counter() - t0
        settings = [(m, float(f)) for m in args.modes.split(",") for f in args.floors.split(",")]
        for mode, floor in settings:
            peaks.floor, peaks.mode = floor, mode
            bounded = ACGModel(ModelWeights(model, tcs, bos, peaks))
            r = evaluate(bounded, cfg, args.per_domain).to_dict()
            row = {
                "kind": kind,
                "contexts": n,
                "pairs_seen": len(peaks.pairs),
                "measure_seconds": round(seconds, 1),
                "mode": mode,
                "floor": floor,
                "attack_success_rate": r["backdoor"]["attack_success_rate"],
                "false_trigger_rate": r["backdoor"]["false_trigger_rate"],
                "ce_loss": r["ce_loss"],
                "domains": r["domains"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "model": args.model,
        "transcoders": args.transcoders,
        "per_domain": args.per_domain,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
