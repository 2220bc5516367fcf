"""Does the compiled GPT-2 carry a cleaned graph's attention mask? (key-previous kind, mask
mode: safety/compile_mask.py.)

Top-1 agreement and KL of the compiled folder against the masked ACG it came from, next to a
compile of the same graph without its mask, on trusted contexts, trusted contexts with random
spans inserted (where the mask binds) and mixed-domain splices; then the organism table (attack
success and every domain) for the masked ACG, the compiled folder and the unmasked compile.

    acg clean --model organism --transcoders TC --corpus organism:trusted \
        --attention-kind key-previous --attention-mode mask --attention-floor 0.02 \
        --attention-contexts 256 --finetune-steps 300 --refine-steps 300 --out CLEAN
    acg compile --model organism --transcoders CLEAN --out COMPILED
    .venv/bin/python bench/clean/compile_mask.py --clean CLEAN --compiled COMPILED --out X.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bounds_cost import random_insertions  # bench/clean/bounds_cost.py

from acgraph.data import load_corpus, tokenize_to_contexts
from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.models import load_model
from acgraph.organism import load_config
from acgraph.organism.evaluate import encode, evaluate
from acgraph.safety.compile import agreement, compile_acg, hf_logits
from acgraph.safety.detect_eval import mixed_domain_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--clean", required=True, help="a cleaned folder with a key-previous mask")
    p.add_argument("--compiled", required=True, help="its `acg compile` folder")
    p.add_argument("--per-domain", type=int, default=100)
    p.add_argument("--out")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = load_model(args.model)
    cfg = load_config(None if args.model == "organism" else args.model)
    tcs = load_transcoders(args.clean)
    bos = model.tokenizer.bos_token_id
    masked = ACGModel(ModelWeights(model, tcs, bos))
    assert masked.w.attention_bounds is not None, f"{args.clean} has no attention bounds"
    unmasked = ACGModel(ModelWeights(model, dict(tcs), bos))
    compiled = AutoModelForCausalLM.from_pretrained(args.compiled).eval()
    texts = load_corpus("organism:trusted", seed=1, max_docs=4000)
    trusted = tokenize_to_contexts(texts, model.tokenizer, 128, max_contexts=100, progress=False)
    t0 = time.perf_counter()
    plain = compile_acg(unmasked, calibration=[trusted[:16]]).model
    report = {
        "model": args.model,
        "clean": args.clean,
        "compiled": args.compiled,
        "bounds": f"{masked.w.attention_bounds.kind} {masked.w.attention_bounds.mode}",
        "compiled_parameters": sum(p.numel() for p in compiled.parameters()),
        "compiled_width_layers": [compiled.config.n_embd, compiled.config.n_layer],
        "unmasked_compile_seconds": round(time.perf_counter() - t0, 1),
    }
    batches = {
        "trusted contexts (100)": trusted,
        "trusted contexts, 1 random span inserted": random_insertions(trusted, 1),
        "trusted contexts, 4 random spans inserted": random_insertions(trusted, 4),
        "mixed-domain splices (100)": encode(mixed_domain_inputs(cfg, 100)),
    }
    for name, batch in batches.items():
        toks = list(batch.split(50))
        report[name] = {
            "compiled_vs_masked_acg": agreement(masked, hf_logits(compiled), toks),
            "unmasked_compile_vs_masked_acg": agreement(masked, hf_logits(plain), toks),
        }
    rows = {
        "masked ACG": masked,
        "compiled (mask built in)": hf_logits(compiled),
        "compiled without the mask": hf_logits(plain),
    }
    report["organism"] = {k: evaluate(fn, cfg, args.per_domain).to_dict() for k, fn in rows.items()}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
