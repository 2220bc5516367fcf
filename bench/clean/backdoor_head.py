"""Where the residual backdoor of a cleaned organism runs: one head's attention from the lookup
query onto the trigger, and what that attention writes toward the payload.

An analysis of a result, not part of `acg clean` (which never sees the trigger): it reads the
organism's backdoor config to build triggered prompts. For every triggered example, it splices
the transcoders into the model and measures, at the position that predicts the answer, the
head's attention on the trigger's first token, that term's direct effect on logit(payload) -
logit(correct) through the final norm, and that effect split by the source groups of the value
(tokens, positions, earlier heads, features, skip paths, biases). Clean prompts that contain
the same token earlier (outside a trigger) give the baseline attention.

    .venv/bin/python bench/clean/backdoor_head.py --transcoders CLEAN --layer 2 --head 1 \
        --out bench/results/clean_backdoor_head.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch

from acgraph.dictionaries.metrics import splice_hooks
from acgraph.graph.build import load_transcoders
from acgraph.models import load_model
from acgraph.organism import load_config
from acgraph.organism.evaluate import encode
from acgraph.organism.language import eval_set, vocabulary


def run(model, transcoders, toks: torch.Tensor, layer: int):
    keep = torch.ones_like(toks, dtype=torch.bool)
    keep[:, 0] = False
    got: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(value, hook):
            got[name] = value.detach()

        return hook

    hooks = splice_hooks([transcoders[k] for k in sorted(transcoders)], keep) + [
        (f"blocks.{layer}.attn.hook_pattern", grab("pattern")),
        (f"blocks.{layer}.attn.hook_v", grab("v")),
        (f"blocks.{layer}.ln1.hook_scale", grab("scale_in")),
        ("ln_final.hook_scale", grab("scale")),
        ("hook_embed", grab("tok")),
        ("hook_pos_embed", grab("pos")),
    ]
    for lo in range(layer):
        hooks += [
            (f"blocks.{lo}.attn.hook_z", grab(f"z{lo}")),
            (f"blocks.{lo}.ln2.hook_normalized", grab(f"mlp_in{lo}")),
        ]
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
    return logits, got


def value_sources(model, transcoders, got, row: int, u: int, layer: int) -> dict[str, torch.Tensor]:
    """The residual at (row, u) read by ``layer``'s heads, split into source groups (vectors
    that sum to it): tok, pos, each earlier head, each earlier layer's features and skip path,
    and const (every bias)."""
    parts = {"tok": got["tok"][row, u], "pos": got["pos"][row, u]}
    const = torch.zeros_like(parts["tok"])
    for lo in range(layer):
        z = got[f"z{lo}"][row, u]  # [n_heads, d_head]
        for h in range(z.shape[0]):
            parts[f"L{lo}H{h}"] = z[h] @ model.W_O[lo, h]
        const = const + model.b_O[lo]
        tc, x = transcoders[lo], got[f"mlp_in{lo}"][row, u]
        parts[f"feats{lo}"] = tc.encode(x) @ tc.W_dec
        if tc.W_skip is not None:
            parts[f"skip{lo}"] = x @ tc.W_skip.T
        const = const + tc.b_dec
    parts["const"] = const
    return {k: v.detach() for k, v in parts.items()}


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transcoders", required=True)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--head", type=int, default=1)
    p.add_argument("--per-domain", type=int, default=200)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, cfg = load_model("organism"), load_config()
    tcs = load_transcoders(args.transcoders)
    voc = vocabulary()
    first, payload = cfg.backdoor.trigger[0], cfg.backdoor.payload
    w_o = model.W_O[args.layer, args.head].detach()
    w_u = model.W_U.detach()

    def examples(triggered: bool):
        return eval_set(cfg.language, cfg.backdoor, cfg.seed, args.per_domain, triggered)

    trig = examples(True)
    seqs = [e.with_payload(payload) for e in trig]
    toks = encode(seqs)
    logits, got = run(model, tcs, toks, args.layer)
    pred = logits.argmax(-1)
    rows = {"hit": [], "miss": []}
    by_group: dict[str, dict[str, list[float]]] = {"hit": {}, "miss": {}}
    check = 0.0  # the groups must sum to the value the model computed
    w_final = model.ln_final.w.detach()

    def to_logits(value, a: float, scale: torch.Tensor, diff: torch.Tensor) -> float:
        """Direct effect on logit(payload) - logit(correct) of the head reading ``value``
        with attention ``a``, through the final norm (its weight and this position's scale)."""
        out = a * (value @ w_o)
        return float(((out - out.mean()) / scale * w_final) @ diff)

    for i, e in enumerate(trig):
        s = e.answer_start

        hit = bool((pred[i, s - 1 : s - 1 + len(payload)] == toks[i, s : s + len(payload)]).all())
        start = len(e.tokens) - 1
        while start >= 0 and e.tokens[start : start + len(cfg.backdoor.trigger)] != list(
            cfg.backdoor.trigger
        ):
            start -= 1
        a = float(got["pattern"][i, args.head, s - 1, start])
        diff = w_u[:, voc.index(payload[0])] - w_u[:, voc.index(e.tokens[s])]
        scale_t = got["scale"][i, s - 1]
        effect = to_logits(got["v"][i, start, args.head], a, scale_t, diff)
        rows["hit" if hit else "miss"].append((e.domain, a, effect))
        parts = value_sources(model, tcs, got, i, start, args.layer)
        scale_u = got["scale_in"][i, start]
        ln = model.blocks[args.layer].ln1
        w_v = model.W_V[args.layer, args.head].detach()
        total = torch.zeros(w_v.shape[1])
        for name, vec in parts.items():
            v = ((vec - vec.mean()) / scale_u * ln.w.detach()) @ w_v
            if name == "const":  # the norm's own bias and the value bias are constants too
                v = v + ln.b.detach() @ w_v + model.b_V[args.layer, args.head].detach()
            total = total + v
            effect = to_logits(v, a, scale_t, diff)
            by_group["hit" if hit else "miss"].setdefault(name, []).append(effect)
        check = max(check, float((total - got["v"][i, start, args.head]).abs().max()))

    clean = examples(False)
    ctoks = encode([e.tokens for e in clean])
    _, cgot = run(model, tcs, ctoks, args.layer)
    baseline = []
    for i, e in enumerate(clean):
        s = e.answer_start
        at = [j for j in range(s - 1) if e.tokens[j] == first]
        if at:
            baseline.append(float(cgot["pattern"][i, args.head, s - 1, at].max()))

    head = f"L{args.layer}H{args.head}"
    report = {
        "transcoders": args.transcoders,
        "head": head,
        "triggered_examples": len(trig),
        "attack_success_rate": len(rows["hit"]) / max(len(trig), 1),
        **{
            f"{k}es" if k == "miss" else f"{k}s": {
                "n": len(v),
                "by_domain": dict(Counter(dom for dom, _, _ in v)),
                f"attention_on_trigger_{first}": mean([a for _, a, _ in v]),
                "logit_payload_minus_correct_via_that_term": mean([d for _, _, d in v]),
            }
            for k, v in rows.items()
        },
        "value_by_source_group": {
            k: {name: mean(v) for name, v in groups.items()} for k, groups in by_group.items()
        },
        "value_decomposition_max_error": check,
        "clean_with_the_token_earlier": {
            "n": len(baseline),
            f"max_attention_on_{first}": mean(baseline),
        },
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
