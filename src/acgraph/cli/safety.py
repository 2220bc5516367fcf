"""`acg clean`, `acg compile`, `acg distill`: remove what trusted data never uses, compile the
graph back into a plain network, keep only what one task needs (docs/clean.md).

acg clean --model organism --transcoders TC --corpus organism:trusted --out CLEAN
          [--finetune-steps 300] [--refine-steps 300] [--min-frequency 1e-4] [--ceiling 1.0]
          [--drop-energy 1e-4]
acg compile --model organism --transcoders CLEAN|TC|organism --out HFDIR [--mode jumprelu]
acg distill --model organism --transcoders CLEAN --task arithmetic [--budgets 1,0.5,0.25]
            [--refine-steps 300] [--heads 0.5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from acgraph.errors import ConfigError

UNTRUSTED_WORDS = ("poison", "trigger", "payload")
# graph/attention_bounds.py's KINDS and MODES, spelled out so the parser needs no torch import
ATTENTION_KINDS = ("key-bigram", "query-key", "key-previous")
ATTENTION_MODES = ("cap", "mask")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="keep only what trusted data uses (backdoor removal)")
    p.add_argument("--model", required=True, metavar="SPEC", help="model spec")
    p.add_argument(
        "--transcoders",
        required=True,
        metavar="DIR",
        help="MLP transcoders trained on trusted data",
    )
    p.add_argument("--corpus", required=True, metavar="SPEC", help="the trusted corpus")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--contexts", type=int, default=256, help="trusted contexts (256)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (128)")
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="end-to-end (KL) fine-tuning steps of the transcoders on the trusted corpus (0)",
    )
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="fine-tuning rate (3e-4)")
    _refine_args(p, "after cleaning, on the trusted corpus")
    p.add_argument("--min-frequency", type=float, default=1e-4, help="feature usage floor")
    p.add_argument("--ceiling", type=float, default=1.0, help="activation cap x trusted max")
    p.add_argument("--no-ceiling", action="store_true", help="do not cap activations")
    p.add_argument(
        "--drop-energy", type=float, default=1e-4, help="MLP input energy dropped (1e-4)"
    )
    p.add_argument("--topk", action="store_true", help="keep TopK (not compilable exactly)")
    p.add_argument(
        "--attention-floor",
        type=float,
        default=0.1,
        help="attention any token pair may get; above it only what trusted data gave (0.1)",
    )
    p.add_argument(
        "--attention-kind",
        choices=ATTENTION_KINDS,
        default="key-bigram",
        help="token pair the bounds are kept by: a key and the token after (key-bigram) or "
        "before it (key-previous), or query and key",
    )
    p.add_argument(
        "--attention-mode",
        choices=ATTENTION_MODES,
        default="cap",
        help="cap: weights above the bound go to BOS; mask: keys whose pair trusted data gave "
        "less than the floor get -inf before the softmax (key-previous masks compile into "
        "`acg compile`'s network)",
    )
    p.add_argument("--no-attention-bounds", action="store_true", help="leave attention as is")
    p.add_argument(
        "--attention-contexts",
        type=int,
        default=2048,
        help="trusted contexts the attention bounds are measured on (2048)",
    )
    p.add_argument("--per-domain", type=int, default=100, help="organism examples per domain")
    _common(p)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser(
        "compile", help="compile a level-1 ACG into a plain HF folder (GPT-2, or Llama)"
    )
    p.add_argument("--model", required=True, metavar="SPEC", help="model spec")
    p.add_argument(
        "--transcoders",
        required=True,
        metavar="DIR",
        help="transcoders, 'organism', or an `acg clean` output folder",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output HF folder")
    p.add_argument("--mode", choices=("jumprelu", "shift", "relu"), default="jumprelu")
    p.add_argument("--ramp", type=float, default=1e-4, help="JumpReLU ramp width (1e-4)")
    p.add_argument("--corpus", default=None, metavar="SPEC", help="calibration/eval corpus")
    p.add_argument("--contexts", type=int, default=64, help="calibration + eval contexts (64)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (128)")
    p.add_argument("--per-domain", type=int, default=100, help="organism examples per domain")
    _common(p)
    p.set_defaults(func=cmd_compile)
    _register_distill(sub)


def _register_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="keep the features one task needs; compile the result")
    p.add_argument("--model", required=True, metavar="SPEC", help="model spec")
    p.add_argument("--transcoders", required=True, metavar="DIR", help="transcoders or CLEAN")
    p.add_argument(
        "--task", required=True, metavar="TASK", help="an organism domain, or a corpus spec"
    )
    p.add_argument("--budgets", default="1,0.5,0.25,0.1", help="feature fractions to keep")
    p.add_argument("--contexts", type=int, default=64, help="task contexts (64)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (128)")
    p.add_argument("--out", metavar="DIR", help="compile one budget's graph here")
    p.add_argument(
        "--compile-budget", type=float, default=None, help="budget to compile (the smallest)"
    )
    p.add_argument(
        "--heads",
        type=float,
        default=1.0,
        help="fraction of all heads kept (the rest mean-ablated)",
    )
    _refine_args(p, "on the task, per budget")
    p.add_argument("--report", metavar="FILE", help="write the curve as JSON here")
    p.add_argument("--per-domain", type=int, default=100, help="organism examples per domain")
    _common(p)
    p.set_defaults(func=cmd_distill)


def _refine_args(p: argparse.ArgumentParser, when: str) -> None:
    """Refinement: KL training of the kept features toward the original model."""
    p.add_argument(
        "--refine-steps", type=int, default=0, help=f"KL steps of the kept features {when} (0)"
    )
    p.add_argument("--refine-lr", type=float, default=1e-4, help="refinement rate (1e-4)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="corpus seed (generated corpora)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _batches(model: Any, corpus: str, n: int, context_size: int, seed: int) -> list:
    from acgraph.data import load_corpus, tokenize_to_contexts

    if n < 1:
        raise ConfigError(f"--contexts must be at least 1, got {n}")
    texts = load_corpus(corpus, seed=seed, max_docs=max(64, n * 40))
    tokens = tokenize_to_contexts(texts, model.tokenizer, context_size, max_contexts=n)
    return list(tokens.split(16))


def _organism_eval(model_spec: str, logits_fn: Any, n: int) -> dict | None:
    """The organism's scores for organism models (None for any other model)."""
    from acgraph.organism import load_config

    if model_spec != "organism" and not (Path(model_spec) / "organism.json").is_file():
        return None
    from acgraph.organism.evaluate import evaluate

    folder = None if model_spec == "organism" else model_spec
    return evaluate(logits_fn, load_config(folder), n).to_dict()


def format_clean_table(rows: dict[str, dict]) -> str:
    """Organism evaluations as a table: attack success, false triggers, CE, every domain."""
    domains = list(next(iter(rows.values()))["domains"])
    head = ["", "ASR", "false trigger", "CE", *domains]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        b = r["backdoor"]
        cells = [b["attack_success_rate"], b["false_trigger_rate"], r["ce_loss"]]
        cells += [r["domains"][d] for d in domains]
        lines.append(f"| {name} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines)


def _row(name: str, r: dict) -> str:
    doms = " ".join(f"{k[:5]}={v:.3f}" for k, v in r["domains"].items())
    b = r["backdoor"]
    return (
        f"  {name:<10} ASR={b['attack_success_rate']:.4f} false={b['false_trigger_rate']:.4f} "
        f"CE={r['ce_loss']:.4f} {doms}"
    )


def cmd_clean(args: argparse.Namespace) -> int:
    import torch

    from acgraph.graph import ACGModel, load_transcoders
    from acgraph.graph.weights import ModelWeights
    from acgraph.models import load_model
    from acgraph.safety.clean import CleanConfig, clean, save_cleaned

    torch.set_num_threads(args.threads)
    if any(w in args.corpus.lower() for w in UNTRUSTED_WORDS):
        raise ConfigError(f"`acg clean` takes a trusted corpus only, not {args.corpus!r}")
    cfg = CleanConfig(
        min_frequency=args.min_frequency,
        ceiling=None if args.no_ceiling else args.ceiling,
        jumprelu=not args.topk,
        drop_energy=args.drop_energy if args.drop_energy > 0 else None,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
        refine_steps=args.refine_steps,
        refine_lr=args.refine_lr,
        attention_floor=None if args.no_attention_bounds else args.attention_floor,
        attention_kind=args.attention_kind,
        attention_mode=args.attention_mode,
    )
    cfg.validate()
    start = time.perf_counter()
    model = load_model(args.model)
    tcs = load_transcoders(args.transcoders)
    trusted = _batches(model, args.corpus, args.contexts, args.context_size, args.seed)
    bos = model.tokenizer.bos_token_id
    report: dict[str, Any] = {"model": args.model, "transcoders": args.transcoders}
    before = _organism_eval(args.model, model, args.per_domain)
    acg_before = _organism_eval(
        args.model, ACGModel(ModelWeights(model, tcs, bos)), args.per_domain
    )
    wide = None
    if cfg.attention_floor is not None and args.attention_contexts > args.contexts:
        wide = _batches(model, args.corpus, args.attention_contexts, args.context_size, args.seed)
    result = clean(model, tcs, trusted, cfg, wide)
    after = _organism_eval(args.model, result.acg, args.per_domain)
    report.update(result.info)
    report["organism"] = {"original": before, "acg_before": acg_before, "cleaned": after}
    if after is not None and cfg.attention_floor is not None:  # what the bounds add
        unbounded = ACGModel(ModelWeights(model, result.transcoders, bos))
        report["organism"]["cleaned_unbounded"] = _organism_eval(
            args.model, unbounded, args.per_domain
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    save_cleaned(result, args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    kept = ", ".join(f"L{k}: {v}/{report['features'][k]}" for k, v in result.info["kept"].items())
    print(f"cleaned ACG ({kept} features kept) -> {args.out}")
    if after is not None:
        print(_row("original", before))
        print(_row("ACG", acg_before))  # trusted transcoders as given, before any fine-tuning
        if "cleaned_unbounded" in report["organism"]:
            print(_row("no bounds", report["organism"]["cleaned_unbounded"]))
        print(_row("cleaned", after))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import torch

    from acgraph.graph import ACGModel, load_transcoders
    from acgraph.graph.weights import ModelWeights
    from acgraph.models import load_model
    from acgraph.safety.compile import (
        agreement,
        compile_acg,
        derive_transcoder,
        hf_logits,
        save_compiled,
    )

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    tcs = load_transcoders(args.transcoders)
    corpus = args.corpus or ("organism:trusted" if args.model == "organism" else None)
    if corpus is None:
        raise ConfigError("pass --corpus SPEC (calibration and agreement text)")
    if args.contexts < 2:
        raise ConfigError("--contexts must be at least 2 (half calibrate, half measure)")
    batches = _batches(model, corpus, args.contexts, args.context_size, args.seed)
    cal, held = (
        batches[: max(1, len(batches) // 2)],
        batches[max(1, len(batches) // 2) :] or batches,
    )
    acg = ACGModel(ModelWeights(model, tcs, model.tokenizer.bos_token_id))
    result = compile_acg(acg, mode=args.mode, calibration=cal, ramp=args.ramp)
    report: dict[str, Any] = dict(result.info)
    report["agreement_vs_acg"] = agreement(acg, hf_logits(result.model), held)
    report["agreement_vs_original"] = agreement(model, hf_logits(result.model), held)
    if result.thresholds:  # TopK: how much of the error is TopK -> JumpReLU, not compiling
        jump = {
            i: derive_transcoder(tc, threshold=result.thresholds[i])
            if i in result.thresholds
            else tc
            for i, tc in tcs.items()
        }
        jacg = ACGModel(ModelWeights(model, jump, model.tokenizer.bos_token_id))
        report["agreement_vs_acg_as_jumprelu"] = agreement(jacg, hf_logits(result.model), held)
        report["topk_to_jumprelu"] = agreement(acg, jacg, held)
    unbounded = None
    if acg.w.attention_bounds is not None:  # the part that compiles: the ACG without them
        unbounded = ACGModel(ModelWeights(model, dict(tcs), model.tokenizer.bos_token_id))
        report["agreement_vs_acg_without_bounds"] = agreement(
            unbounded, hf_logits(result.model), held
        )
    report["organism"] = {
        "acg": _organism_eval(args.model, acg, args.per_domain),
        "compiled": _organism_eval(args.model, hf_logits(result.model), args.per_domain),
    }
    if unbounded is not None:
        report["organism"]["acg_without_bounds"] = _organism_eval(
            args.model, unbounded, args.per_domain
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    result.info.update(report)
    save_compiled(result, model.tokenizer, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    a = report["agreement_vs_acg"]
    print(
        f"compiled ({report['architecture']}, {args.mode}) -> {args.out}: "
        f"{report['parameters']:,} parameters "
        f"(original {report['original_parameters']:,}), n_inner {report['n_inner']}; vs the ACG: "
        f"top-1 {a['top1_agreement']:.4f} (confident positions "
        f"{a['top1_agreement_confident']:.4f}), KL {a['kl']:.2e} over {a['positions']} positions"
    )
    if "topk_to_jumprelu" in report:
        j, t = report["agreement_vs_acg_as_jumprelu"], report["topk_to_jumprelu"]
        print(
            f"  TopK is not a per-unit activation: TopK ACG vs its JumpReLU form top-1 "
            f"{t['top1_agreement']:.4f}, KL {t['kl']:.2e}; JumpReLU ACG vs compiled top-1 "
            f"{j['top1_agreement']:.4f}, KL {j['kl']:.2e}"
        )
    if unbounded is not None:
        u = report["agreement_vs_acg_without_bounds"]
        print(
            f"  attention bounds: {report['attention_bounds']}; vs the ACG without them top-1 "
            f"{u['top1_agreement']:.4f}, KL {u['kl']:.2e}"
        )
        if report["attention_bounds"] == "not compiled":
            print(
                "  (bounds that compile: acg clean --attention-kind key-previous "
                "--attention-mode mask; docs/clean.md)"
            )
    org = report["organism"]
    if org["compiled"] is not None:
        print(_row("ACG", org["acg"]))
        if "acg_without_bounds" in org:
            print(_row("no bounds", org["acg_without_bounds"]))
        print(_row("compiled", org["compiled"]))
    return 0


def _task_batches(model: Any, task: str, n: int, context_size: int, seed: int) -> list:
    from acgraph.organism import DOMAINS

    if task not in DOMAINS:
        return _batches(model, task, n, context_size, seed)
    from acgraph.data import tokenize_to_contexts
    from acgraph.organism import OrganismConfig, generate_texts
    from acgraph.organism.config import LanguageConfig

    weights = {d: float(d == task) for d in DOMAINS}
    cfg = OrganismConfig(language=LanguageConfig(domain_weights=weights))
    texts = generate_texts(max(64, n * 20), seed=seed + 17, split="trusted", config=cfg)
    tokens = tokenize_to_contexts(texts, model.tokenizer, context_size, max_contexts=n)
    return list(tokens.split(16))


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from acgraph.graph import load_transcoders
    from acgraph.io import atomic_write_json
    from acgraph.models import load_model
    from acgraph.safety.compile import compile_acg, hf_logits, save_compiled
    from acgraph.safety.distill import distill

    torch.set_num_threads(args.threads)
    try:
        budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()}, reverse=True)
    except ValueError:
        raise ConfigError(
            f"--budgets takes comma-separated fractions, got {args.budgets!r}"
        ) from None
    model = load_model(args.model)
    tcs = load_transcoders(args.transcoders)
    task = _task_batches(model, args.task, args.contexts, args.context_size, args.seed)
    curve = []
    last = None
    for budget in budgets:
        result = distill(
            model, tcs, task, budget, head_budget=args.heads, refine_steps=args.refine_steps,
            refine_lr=args.refine_lr, seed=args.seed, progress=True,
        )  # fmt: skip
        acg, kept = result.acg, result.transcoders
        org = _organism_eval(args.model, acg, args.per_domain)
        row = {
            "budget": budget,
            "features": {str(i): t.d_sae for i, t in kept.items()},
            "heads": [[int(h) for h in layer.nonzero()[:, 0]] for layer in result.heads],
        }
        if result.refine_kl:
            row["refine"] = {
                "steps": args.refine_steps,
                "lr": args.refine_lr,
                "kl_first": result.refine_kl[0],
                "kl_last": result.refine_kl[-1],
            }
        if org is not None:
            row.update(domains=org["domains"], ce_loss=org["ce_loss"], backdoor=org["backdoor"])
        curve.append(row)
        if args.compile_budget is None or abs(budget - args.compile_budget) < 1e-9:
            last = (acg, row)
        doms = " ".join(f"{k[:5]}={v:.3f}" for k, v in row.get("domains", {}).items())
        n_feat, n_heads = sum(row["features"].values()), sum(len(h) for h in row["heads"])
        print(f"budget {budget:>5}: features {n_feat:>5} heads {n_heads} {doms}")
    report: dict[str, Any] = {"task": args.task, "curve": curve}
    if args.out and last is None:
        raise ConfigError(f"--compile-budget {args.compile_budget} is not one of the budgets")
    if args.out and last is not None:
        acg, row = last
        result = compile_acg(acg, calibration=task[:2])
        save_compiled(result, model.tokenizer, args.out)
        compiled = _organism_eval(args.model, hf_logits(result.model), args.per_domain)
        report["compiled"] = {"budget": row["budget"], **result.info, "organism": compiled}
        print(
            f"compiled budget {row['budget']} -> {args.out}: {result.info['parameters']:,} "
            f"parameters (effective MLP {result.info['effective_mlp_parameters']:,})"
        )
    if args.report:
        atomic_write_json(args.report, report)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
