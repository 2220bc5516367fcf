"""`acg train`, `acg finetune` and `acg eval`: train, fine-tune end to end and evaluate sparse
dictionaries (thin over the library)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from acgraph.errors import ArtifactError, ConfigError

KIND_CHOICES = ("transcoder", "skip_transcoder", "sae")
ACTIVATION_CHOICES = ("topk", "batchtopk", "jumprelu", "relu")


def register(sub: argparse._SubParsersAction) -> None:
    _register_train(sub)
    _register_finetune(sub)
    _register_eval(sub)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="SPEC", help="model spec (default: the workspace's)")
    p.add_argument("--corpus", metavar="SPEC", help="corpus spec (default: the workspace's)")
    p.add_argument("--workspace", metavar="WS", help="read model/corpus from this workspace")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (128)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train SAEs / transcoders / skip transcoders on a model's activations",
        description="Train one dictionary per hook (or hook pair) from one model forward per "
        "batch. Writes DIR/<name>/ (SAELens layout) and DIR/checkpoints/; --resume continues a "
        "run exactly.",
    )
    _add_source_args(p)
    p.add_argument(
        "--hooks",
        nargs="+",
        metavar="HOOK",
        help="SAE: hook names; transcoders: IN:OUT pairs "
        "(e.g. blocks.0.ln2.hook_normalized:blocks.0.hook_mlp_out)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="L",
        help="layers ('all' or numbers): transcoders read blocks.L.ln2.hook_normalized and "
        "predict blocks.L.hook_mlp_out; SAEs read blocks.L.hook_resid_post (default: all)",
    )
    p.add_argument("--kind", choices=KIND_CHOICES, default="transcoder")
    p.add_argument("--activation", choices=ACTIVATION_CHOICES, default="topk")
    p.add_argument("--k", type=int, default=32, help="active latents per token (TopK/BatchTopK)")
    p.add_argument("--width", type=int, default=2048, help="latents per dictionary (d_sae)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step (4096)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="gradient-norm clip on the raw MSE scale, as SAELens (1.0; 0 = off)",
    )
    p.add_argument(
        "--model-autocast",
        choices=["bfloat16"],
        default=None,
        help="run the model forward (activations only) under bf16 autocast, as SAELens's "
        "autocast_lm; the forward is about 2x faster on CPUs with bf16 instructions "
        "(default: fp32)",
    )
    p.add_argument(
        "--model-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="load the model's weights in this dtype for the forward (activations only; "
        "dictionaries train in fp32). bfloat16: bf16 matmuls without autocast's per-op casts; "
        "the lean forward keeps the residual stream in fp32",
    )
    p.add_argument(
        "--forward",
        choices=["lean", "compiled", "transformer_lens"],
        default="lean",
        help="how the model runs: lean (the same hook values as TransformerLens, faster; falls "
        "back to TransformerLens for hooks or architectures it does not cover), compiled (the "
        "lean forward under torch.compile: ~25 s to compile, then about 2x faster again with "
        "bf16 weights, little faster in fp32; for long runs), transformer_lens (default: lean)",
    )
    p.add_argument("--l1", type=float, default=1e-3, help="ReLU L1 coefficient")
    p.add_argument("--l0", type=float, default=1e-3, help="JumpReLU L0 coefficient")
    p.add_argument("--dead-tokens", type=int, default=1_000_000, help="tokens until dead")
    p.add_argument(
        "--resample-every",
        type=int,
        default=0,
        help="re-initialize dead latents every N steps (0: off)",
    )
    p.add_argument(
        "--resample-until",
        type=float,
        default=0.5,
        help="fraction of training after which dead latents are no longer re-initialized (0.5)",
    )
    p.add_argument(
        "--aux-k-coef",
        type=float,
        default=1 / 32,
        help="AuxK loss coefficient (TopK/BatchTopK dead latents; 1/32)",
    )
    p.add_argument("--buffer-tokens", type=int, default=65_536, help="shuffle buffer size")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--b-dec-init",
        choices=("mean", "geometric_median", "zeros"),
        default="mean",
        help="decoder bias init from the first block of data (mean)",
    )
    p.add_argument("--shards", metavar="DIR", help="cache activations on disk here and reuse them")
    p.add_argument("--out", metavar="DIR", help="output folder (default: WS/dictionaries)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(func=_train)


def _register_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune MLP transcoders end to end (KL of the model with all of them spliced in)",
        description="Replace every MLP by its transcoder at once and train the transcoders "
        "together to match the model's next-token distribution on a corpus. Raises the "
        "faithfulness of every ACG built from them. Writes OUT/<hook>/ (SAELens layout), "
        "OUT/finetune.json and a checkpoint OUT/checkpoints/finetune.safetensors (--resume).",
    )
    p.add_argument("transcoders", metavar="SPEC", help="transcoders (a folder, or 'organism')")
    _add_source_args(p)
    p.add_argument("--contexts", type=int, default=1024, help="training contexts (1024)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (1000)")
    p.add_argument("--rows", type=int, default=16, help="contexts per step (16)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (3e-4)")
    p.add_argument(
        "--lr-decay",
        type=float,
        default=0.5,
        metavar="F",
        help="the rate falls linearly to 0 over the last fraction F of the steps (0.5; 0: "
        "constant). The schedule follows --steps: resuming with more steps raises the rate again",
    )
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="corpus and sampling seed (0)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(func=_finetune)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="FVU, L0, dead/dense, CE recovered, delta CE and KL of dictionaries",
        description="Evaluate dictionaries (folders in the SAELens layout, or folders holding "
        "them) alone and all spliced in at once, beside zero and mean ablation.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR")
    _add_source_args(p)
    p.add_argument("--contexts", type=int, default=64, help="eval contexts (64)")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward (16)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (generated corpora)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    p.add_argument(
        "--joint-only",
        action="store_true",
        help="splice the dictionaries all at once only, not also one at a time "
        "(N times fewer forward passes for N dictionaries)",
    )
    p.set_defaults(func=_eval)


# ---------------------------------------------------------------- helpers


def _sources(args: argparse.Namespace) -> tuple[str, str, Any]:
    model, corpus, ws = args.model, args.corpus, None
    if args.workspace:
        from acgraph.workspace import Workspace

        ws = Workspace.open(args.workspace)
        model = model or ws.model
        corpus = corpus or ws.corpus
    if not model:
        raise ConfigError("no model: pass --model SPEC or --workspace WS")
    if not corpus:
        raise ConfigError("no corpus: pass --corpus SPEC or a --workspace that has one")
    return model, corpus, ws


def _load(args: argparse.Namespace, n_tokens: int, seed: int):
    import torch

    from acgraph.data import documents_for, load_corpus, tokenize_to_contexts
    from acgraph.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_spec, corpus_spec, ws = _sources(args)
    dtype = getattr(torch, getattr(args, "model_dtype", "float32"))
    model = load_model(model_spec, device=args.device, dtype=dtype)
    if model.tokenizer is None:
        raise ConfigError(f"model {model_spec} has no tokenizer; cannot tokenize the corpus")
    max_contexts = max(1, math.ceil(n_tokens / max(args.context_size - 1, 1)))
    max_docs = documents_for(corpus_spec, n_tokens, args.max_docs)
    texts = load_corpus(corpus_spec, max_docs=max_docs, seed=seed)
    tokens = tokenize_to_contexts(
        texts, model.tokenizer, args.context_size, max_contexts=max_contexts
    )
    return model, tokens, ws, model_spec


def _hook_pairs(args: argparse.Namespace, n_layers: int) -> list[tuple[str, str]]:
    if args.hooks and args.layers:
        raise ConfigError("give --hooks or --layers, not both")
    if args.hooks:
        pairs = []
        for item in args.hooks:
            hook_in, sep, hook_out = item.partition(":")
            if args.kind == "sae":
                if sep:
                    raise ConfigError(f"an SAE takes one hook, not a pair: {item!r}")
                pairs.append((hook_in, hook_in))
            else:
                if not sep or not hook_in or not hook_out:
                    raise ConfigError(f"a transcoder needs IN:OUT, got {item!r}")
                pairs.append((hook_in, hook_out))
        return pairs
    layers_arg = args.layers or ["all"]
    if layers_arg == ["all"]:
        layers = list(range(n_layers))
    else:
        try:
            layers = [int(x) for x in layers_arg]
        except ValueError:
            raise ConfigError(f"--layers takes 'all' or integers, got {layers_arg}") from None
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer} is out of range (the model has {n_layers})")
    if args.kind == "sae":
        return [(f"blocks.{i}.hook_resid_post",) * 2 for i in layers]
    return [(f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out") for i in layers]


# ---------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from acgraph.dictionaries import DictionaryConfig, TrainConfig, hook_widths, train_dictionaries

    model, tokens, ws, model_spec = _load(args, args.tokens, args.seed)
    out = Path(args.out) if args.out else (ws.dictionaries_dir if ws is not None else None)
    if out is None:
        raise ConfigError("no output folder: pass --out DIR or --workspace WS")
    pairs = _hook_pairs(args, model.cfg.n_layers)
    widths = hook_widths(model, sorted({h for pair in pairs for h in pair}))
    configs = [
        DictionaryConfig(
            kind=args.kind,
            d_in=widths[hook_in],
            d_out=widths[hook_out],
            d_sae=args.width,
            hook_in=hook_in,
            hooks_out=[] if args.kind == "sae" else [hook_out],
            activation=args.activation,
            k=args.k,
            l1_coefficient=args.l1,
            l0_coefficient=args.l0,
            dead_tokens=args.dead_tokens,
            aux_k_coefficient=args.aux_k_coef,
            resample_every=args.resample_every,
            resample_until=args.resample_until,
            model_name=model_spec,
            context_size=args.context_size,
        )
        for hook_in, hook_out in pairs
    ]
    train_cfg = TrainConfig(
        total_tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        buffer_tokens=args.buffer_tokens,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        b_dec_init=args.b_dec_init,
        max_grad_norm=args.max_grad_norm or None,
        model_autocast=args.model_autocast,
        model_forward=args.forward,
    )
    result = train_dictionaries(
        model, tokens, configs, out, train_cfg, resume=args.resume, shard_dir=args.shards
    )
    if ws is not None:
        ws.touch()
    last = result.final_metrics().get("dictionaries", {})
    print(f"trained {len(result.dictionaries)} dictionaries, {result.tokens:,} tokens -> {out}")
    for d in result.dictionaries:
        m = last.get(d.cfg.name, {})
        stats = "  ".join(f"{k}={m[k]:.4g}" for k in ("fvu", "l0", "dead") if k in m)
        print(f"  {out / d.cfg.name}  {stats} (last batch)")
    if result.tokens_per_second:
        print(f"  {result.tokens_per_second:,.0f} tokens/s")
    return 0


# ---------------------------------------------------------------- finetune


def _finetune(args: argparse.Namespace) -> int:
    import time

    from acgraph.dictionaries import save_dictionary
    from acgraph.dictionaries.finetune import finetune_end_to_end
    from acgraph.graph import load_transcoders
    from acgraph.io import atomic_write_json

    if args.contexts < 1:
        raise ConfigError(f"--contexts must be at least 1, got {args.contexts}")
    if not 0 <= args.lr_decay <= 1:
        raise ConfigError(f"--lr-decay must be in 0..1, got {args.lr_decay}")
    out = Path(args.out)
    tcs = load_transcoders(args.transcoders)
    if not tcs:
        raise ConfigError(f"no MLP transcoders in {args.transcoders}")
    model, tokens, _, model_spec = _load(args, args.contexts * (args.context_size - 1), args.seed)
    start = time.perf_counter()
    losses = finetune_end_to_end(
        model,
        tcs,
        list(tokens[: args.contexts].split(64)),
        steps=args.steps,
        lr=args.lr,
        lr_decay=args.lr_decay,
        rows=args.rows,
        seed=args.seed,
        checkpoint=out / "checkpoints" / "finetune.safetensors",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    for tc in tcs.values():
        save_dictionary(tc, out / tc.cfg.hook_out)
    tail = losses[-max(1, len(losses) // 20) :]
    report = {
        "model": model_spec,
        "transcoders": args.transcoders,
        "contexts": int(min(args.contexts, len(tokens))),
        "steps": args.steps,
        "rows": args.rows,
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "seed": args.seed,
        "kl_first": losses[0],
        "kl_last_5pct": sum(tail) / len(tail),
        "seconds_this_run": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(out / "finetune.json", report)
    print(
        f"fine-tuned {len(tcs)} transcoders end to end, {args.steps} steps: KL "
        f"{report['kl_first']:.4f} -> {report['kl_last_5pct']:.4f} (mean of the last 5%) -> {out}"
    )
    return 0


# ---------------------------------------------------------------- eval


def _dictionary_dirs(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "cfg.json").is_file():
            found.append(path)
            continue
        children = (
            sorted(p for p in path.iterdir() if (p / "cfg.json").is_file())
            if (path.is_dir())
            else []
        )
        if not children:
            raise ArtifactError(f"no dictionary (cfg.json) in {path} or its subfolders")
        found.extend(children)
    return found


def _eval(args: argparse.Namespace) -> int:
    from acgraph.dictionaries import evaluate_dictionaries, load_dictionary
    from acgraph.io import atomic_write_json

    dirs = _dictionary_dirs(args.dirs)
    model, tokens, _, _ = _load(args, args.contexts * args.context_size, args.seed)
    tokens = tokens[: args.contexts]
    dictionaries = []
    for path in dirs:
        d = load_dictionary(path, device=args.device, model=model)
        d.cfg.name = path.name if d.cfg.name in {x.cfg.name for x in dictionaries} else d.cfg.name
        dictionaries.append(d)
    report = evaluate_dictionaries(
        model, dictionaries, tokens, batch_size=args.batch_size, alone=not args.joint_only
    )
    report["paths"] = {d.cfg.name: str(p) for d, p in zip(dictionaries, dirs, strict=True)}
    if args.report:
        atomic_write_json(args.report, report)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(format_eval_report(report))
    return 0


def format_eval_report(report: dict) -> str:
    """The `acg eval` table: one row per dictionary, then all of them spliced at once."""
    lines = [f"{report['n_tokens']:,} eval tokens; clean CE {report['ce_clean']:.4f} nats"]
    head = f"{'dictionary':32} {'FVU':>7} {'L0':>7} {'dead':>6} {'dense':>6} "
    head += f"{'recov(zero)':>11} {'recov(mean)':>11} {'dCE':>8} {'KL':>8}"
    head += f" {'top-1':>6} {'conf.':>6}"
    lines.append(head)
    rows = list(report["dictionaries"].items())
    if "all" in report:
        rows.append(("all spliced at once", report["all"]))
    for name, e in rows:
        sparse = (
            f"{e['fvu']:7.4f} {e['l0']:7.2f} {e['dead_fraction']:6.3f} {e['dense_fraction']:6.3f}"
            if "fvu" in e
            else f"{'':7} {'':7} {'':6} {'':6}"
        )
        if "kl" not in e:  # not spliced alone (--joint-only)
            lines.append(f"{name[:32]:32} {sparse}")
            continue
        lines.append(
            f"{name[:32]:32} {sparse} {e['ce_recovered_zero']:11.4f} "
            f"{e['ce_recovered_mean']:11.4f} {e['delta_ce']:8.4f} {e['kl']:8.4f} "
            f"{e['top1_agreement']:6.3f} {e.get('top1_agreement_confident', float('nan')):6.3f}"
        )
    lines.append("top-1: agreement with the model's top token; conf.: the same where the model")
    lines.append("gives its top token p > 0.5 (elsewhere near-ties decide it)")
    return "\n".join(lines)
