"""Which heads and layers carry a cleaned organism's residual backdoor, and whether the
attention that carries it is something trusted text also produces.

An analysis of a result, not part of `acg clean` (it reads the organism's backdoor config to
build triggered prompts). The cleaned ACG runs with attention bounds of ``--kind`` measured on
trusted text (``--floor``); at the position that predicts the answer, every head's output,
every layer's features and skip path get their direct effect on logit(payload) −
logit(correct) through the final norm, averaged over hits and misses. For ``--head``, the keys
it attends to most on hits, grouped by their place in the trigger, with the bound's limit
there (how much trusted text allows).

    .venv/bin/python bench/clean/answer_dla.py --model V --transcoders CLEAN --head 2.0 \
        --kind query-key --floor 0.25 --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import torch

from acgraph.data import load_corpus, tokenize_to_contexts
from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.graph.attention_bounds import attention_peaks
from acgraph.models import load_model
from acgraph.organism import load_config
from acgraph.organism.evaluate import encode
from acgraph.organism.language import eval_set, vocabulary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--transcoders", required=True)
    p.add_argument("--kind", default="query-key")
    p.add_argument("--floor", type=float, default=0.25)
    p.add_argument("--contexts", type=int, default=2048)
    p.add_argument("--head", default="2.0", help="LAYER.HEAD whose attention to list")
    p.add_argument("--per-domain", type=int, default=100)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    cfg = load_config(None if args.model == "organism" else args.model)
    voc, bos = vocabulary(), model.tokenizer.bos_token_id
    tcs = dict(load_transcoders(args.transcoders))
    texts = load_corpus("organism:trusted", seed=0, max_docs=args.contexts * 40)
    toks = tokenize_to_contexts(texts, model.tokenizer, 128, max_contexts=args.contexts)
    plain = ACGModel(ModelWeights(model, tcs, bos))
    bounds = attention_peaks(plain, list(toks.split(16)), args.floor, 0, args.kind)
    acg = ACGModel(ModelWeights(model, tcs, bos, bounds))
    trigger, payload = list(cfg.backdoor.trigger), cfg.backdoor.payload
    examples = eval_set(cfg.language, cfg.backdoor, cfg.seed, args.per_domain, True)
    toks = encode([e.with_payload(payload) for e in examples])
    trace = acg.run(toks, keep_resid=True)
    pred = trace.logits.argmax(-1)
    w, H = acg.w, model.cfg.n_heads
    w_final, w_u = model.ln_final.w.detach(), model.W_U.detach()
    layer, head = (int(x) for x in args.head.split("."))
    effects: dict[str, dict[str, list[float]]] = {
        "hit": defaultdict(list),
        "miss": defaultdict(list),
    }
    looks: dict[str, list[tuple[float, float]]] = defaultdict(list)
    hits_by_domain: Counter = Counter()
    for i, e in enumerate(examples):
        s = e.answer_start
        hit = bool((pred[i, s - 1 : s - 1 + len(payload)] == toks[i, s : s + len(payload)]).all())
        hits_by_domain[e.domain] += hit
        diff = w_u[:, voc.index(payload[0])] - w_u[:, voc.index(e.tokens[s])]
        scale = w.scale(trace.resid[-1][i, s - 1][None])[0]

        def effect(v: torch.Tensor, scale=scale, diff=diff) -> float:
            return float(((v - v.mean()) / scale * w_final) @ diff)

        group = effects["hit" if hit else "miss"]
        for lo in range(acg.layout.n_layers):
            z = trace.z[lo][i, s - 1].view(H, -1)
            for h in range(H):
                group[f"L{lo}H{h}"].append(effect(z[h] @ w.W_O[lo][h]))
            group[f"features{lo}"].append(
                effect(trace.acts[lo][i, s - 1] @ w.transcoders[lo].W_dec)
            )
            if trace.skip[lo] is not None:
                group[f"skip{lo}"].append(effect(trace.skip[lo][i, s - 1]))
        if not hit:
            continue
        start = max(j for j in range(len(e.tokens)) if e.tokens[j : j + len(trigger)] == trigger)
        pattern = trace.pattern[layer][i, head, s - 1]
        limit = bounds.limits(layer, toks[i : i + 1])[0, head, s - 1]
        top = pattern.topk(3)
        for a, u in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            where = f"trigger[{u - start}]" if start <= u < start + len(trigger) else "elsewhere"
            name = "BOS" if u == 0 else voc[int(toks[i, u])]
            looks[f"{where} {name}"].append((a, float(limit[u])))
    report = {
        "model": args.model,
        "transcoders": args.transcoders,
        "bounds": {"kind": args.kind, "floor": args.floor, "contexts": args.contexts},
        "hits_by_domain": dict(hits_by_domain),
        "attack_success_rate": sum(hits_by_domain.values()) / len(examples),
        "direct_effect_on_payload_minus_correct": {
            k: {"hits": statistics.fmean(v), "misses": statistics.fmean(effects["miss"][k])}
            for k, v in effects["hit"].items()
        },
        f"L{layer}H{head}_top_keys_on_hits": {
            k: {"n": len(v), "attention": statistics.fmean(a for a, _ in v),
                "limit": statistics.fmean(b for _, b in v)}
            for k, v in sorted(looks.items(), key=lambda kv: -len(kv[1]))[:10]
        },
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
