"""Can a plain GPT-2 learn what the attention bounds do? The compiled network of a cleaned
graph (exact, but without the bounds) is trained to match the bounded ACG's next-token
distribution on trusted contexts and on trusted contexts with random token spans inserted
(where the bounds act), then scored on the organism. Trigger-agnostic: only the evaluation
reads the trigger.

    .venv/bin/python bench/clean/compile_by_distillation.py --transcoders CLEAN \
        --compiled COMPILED --steps 300 --lr 3e-5 --out X.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bounds_cost import random_insertions
from transformers import GPT2LMHeadModel

from acgraph.data import load_corpus, tokenize_to_contexts
from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.models import load_model
from acgraph.organism import load_config
from acgraph.organism.evaluate import encode, evaluate
from acgraph.safety.compile import agreement, hf_logits
from acgraph.safety.detect_eval import mixed_domain_inputs


@torch.no_grad()
def log_probs(acg: ACGModel, toks: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.log_softmax(acg(b).float(), -1) for b in toks.split(32)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--transcoders", required=True, help="a cleaned folder (with its bounds)")
    p.add_argument("--compiled", required=True, help="acg compile's output for it")
    p.add_argument("--contexts", type=int, default=512)
    p.add_argument("--spans", type=int, default=4, help="random spans inserted per context")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--train", choices=("attention", "all"), default="attention")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model)
    cfg = load_config(None if args.model == "organism" else args.model)
    acg = ACGModel(ModelWeights(model, load_transcoders(args.transcoders), 1))
    net = GPT2LMHeadModel.from_pretrained(args.compiled).eval()
    texts = load_corpus("organism:trusted", seed=0, max_docs=(args.contexts + 64) * 40)
    toks = tokenize_to_contexts(
        texts, model.tokenizer, 128, max_contexts=args.contexts + 64, progress=False
    )
    train, held = toks[: args.contexts], toks[args.contexts :]
    probes = random_insertions(train, args.spans)
    mixed = [encode(mixed_domain_inputs(cfg, 100))]

    def scores() -> dict:
        run = hf_logits(net)
        return {
            "vs_acg_trusted": agreement(acg, run, list(held.split(16))),
            "vs_acg_mixed": agreement(acg, run, mixed),
            "organism": evaluate(run, cfg, 100).to_dict(),
        }

    report = {"args": vars(args), "before": scores()}
    teacher_probes, teacher_trusted = log_probs(acg, probes), log_probs(acg, train)
    for name, param in net.named_parameters():
        param.requires_grad_(args.train == "all" or ".attn." in name)
    opt = torch.optim.Adam([q for q in net.parameters() if q.requires_grad], lr=args.lr)
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):  # half probes, half trusted: learn the bounds, keep the rest
        i, j = torch.randint(0, args.contexts, (8,)), torch.randint(0, args.contexts, (8,))
        target = torch.cat([teacher_probes[i], teacher_trusted[j]])
        student = F.log_softmax(net(torch.cat([probes[i], train[j]])).logits, -1)
        loss = (target.exp() * (target - student)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.requires_grad_(False)
    report |= {
        "train_seconds": round(time.perf_counter() - start, 1),
        "kl_first_last": [sum(losses[:20]) / 20, sum(losses[-20:]) / 20],
        "after": scores(),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
