"""`acg build`, `acg faithfulness`, `acg explain-feature`: the global, runnable ACG.

acg build --model organism --transcoders organism --corpus organism:poisoned --out ACG
acg build --workspace WS                 (model, corpus and dictionaries from WS -> WS/acg)
acg tune ACG|WS --k 32 [--pairs 65536] [--steps 500]
acg faithfulness ACG|WS [--contexts 64] [--k 1,2,4,...] [--pairs 16384]
acg explain-feature ACG|WS L2/117 [--k 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from acgraph.errors import ArtifactError, ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build the global ACG of a model and its transcoders")
    p.add_argument("--workspace", metavar="WS", help="take model, corpus, dictionaries from WS")
    p.add_argument("--model", metavar="SPEC", help="model spec (default: the workspace's)")
    p.add_argument("--corpus", metavar="SPEC", help="statistics corpus (default: workspace's)")
    p.add_argument(
        "--transcoders",
        metavar="DIR",
        help="folder of MLP transcoders, or 'organism' (default: WS/dictionaries)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: WS/acg)")
    p.add_argument("--contexts", type=int, default=128, help="statistics contexts (128)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (128)")
    p.add_argument("--max-k", type=int, default=64, help="in-edges stored per feature (64)")
    p.add_argument("--max-pairs", type=int, default=16384, help="QK pairs stored per head")
    p.add_argument("--no-qk", action="store_true", help="skip QK pairs (no level 3)")
    p.add_argument(
        "--pair-candidates",
        type=int,
        default=4096,
        help="sources per side and layer whose QK pairs are ranked (where a site has more)",
    )
    p.add_argument(
        "--pair-importance",
        choices=("attribution", "fisher", "abs"),
        default="attribution",
        help="how QK pairs are ranked: attribution (mean |gradient x contribution|: what dropping "
        "one does to the output), fisher (the same squared: its cost in KL) or abs (mean "
        "|contribution| to the score) (attribution)",
    )
    p.add_argument(
        "--fit-k",
        default="8,32,64",
        help="k values to fit least-squares formulas for ('' for none; default 8,32,64)",
    )
    p.add_argument(
        "--fit-pool",
        type=int,
        default=4,
        help="fitted formulas choose their k edges greedily from the top POOL*k ranked ones, "
        "at most --max-k (4; 1: the top k)",
    )
    p.add_argument(
        "--fit-fanin",
        choices=("fixed", "adaptive"),
        default="fixed",
        help="fixed: every feature gets k in-edges; adaptive: k per feature on average over "
        "each layer, spent where the error drops most (fixed)",
    )
    p.add_argument(
        "--max-fanin",
        type=int,
        default=None,
        help="with --fit-fanin adaptive: most in-edges one feature may get (4*k, at most --max-k)",
    )
    p.add_argument(
        "--fit-importance",
        choices=("fisher", "decoder"),
        default=None,
        help="with --fit-fanin adaptive: how a feature's errors are priced when the layer's "
        "edges are shared out: fisher (what they cost the output's KL) or decoder (|W_dec|^2) "
        "(fisher)",
    )
    p.add_argument(
        "--fit-loss",
        choices=("squared", "censored"),
        default="squared",
        help="what fitted formulas minimise: squared error of the pre-activation everywhere, or "
        "censored: where the feature is off, only predictions that would turn it on count "
        "(squared)",
    )
    _common(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "tune",
        help="train the fitted formulas' weights end to end (KL to the model's outputs)",
        description="Keep the k in-edges of every fitted formula (and, with --pairs, each "
        "head's top QK pairs) and train their weights together on the build corpus so the "
        "graph's next-token distribution matches the model's. Stored beside the fitted "
        "formulas; `acg faithfulness` reports them as levels 2t/3t.",
    )
    p.add_argument("acg", metavar="ACG", help="ACG folder or workspace")
    p.add_argument("--k", type=int, required=True, help="fitted formulas to tune (their k)")
    p.add_argument("--pairs", type=int, default=None, help="also tune this many QK pairs/head")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (500)")
    p.add_argument(
        "--lr", type=float, default=1e-4, help="Adam learning rate (1e-4: formulas start fitted)"
    )
    p.add_argument(
        "--lr-decay",
        type=float,
        default=0.5,
        help="fraction of the steps at the end over which the rate falls linearly to 0; "
        "0: a constant rate (0.5)",
    )
    p.add_argument("--rows", type=int, default=16, help="contexts per step (16)")
    p.add_argument("--contexts", type=int, default=512, help="training contexts (512)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue ACG/checkpoints/tune{k}")
    p.add_argument(
        "--validation-contexts",
        type=int,
        default=32,
        help="build-corpus contexts (another seed than training and `acg faithfulness`) whose "
        "KL picks the step kept, step 0 included; 0: keep the last step (32)",
    )
    p.add_argument("--validate-every", type=int, default=50, help="steps between checks (50)")
    _common(p, seed_help="seed of the contexts each step draws (the corpus is the build's)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("faithfulness", help="measure the ACG against the original model")
    p.add_argument("acg", metavar="ACG", help="ACG folder or workspace")
    p.add_argument("--corpus", metavar="SPEC", help="held-out corpus (default: the build's)")
    p.add_argument("--contexts", type=int, default=64, help="held-out contexts (64)")
    p.add_argument("--k", default="1,2,4,8,16,32,64", help="in-edges per feature to test")
    p.add_argument("--pairs", type=int, default=None, help="QK pairs per head for level 3")
    p.add_argument("--no-level3", action="store_true", help="skip level 3")
    p.add_argument("--per-domain", type=int, default=100, help="organism examples per domain")
    p.add_argument("--report", metavar="DIR", help="write JSON + PNG here (default: reports/)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p)
    p.set_defaults(func=cmd_faithfulness)

    p = sub.add_parser("explain-feature", help="a feature's formula over its parents")
    p.add_argument("acg", metavar="ACG", help="ACG folder or workspace")
    p.add_argument("feature", metavar="LAYER/ID", help="e.g. L2/117")
    p.add_argument("--k", type=int, default=8, help="terms to show (8)")
    p.add_argument("--contexts", type=int, default=16, help="contexts for R² (16; 0 = skip)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=cmd_explain)


def _common(p: argparse.ArgumentParser, seed_help: str = "corpus seed (generated corpora)") -> None:
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward (16)")


# ---------------------------------------------------------------- helpers


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _batches(model: Any, corpus: str, n: int, context_size: int, seed: int, batch: int):
    from acgraph.data import load_corpus, tokenize_to_contexts

    if n < 1:
        raise ConfigError(f"--contexts must be at least 1, got {n}")
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer; cannot tokenize the corpus")
    texts = load_corpus(corpus, seed=seed, max_docs=max(64, n * 40))
    tokens = tokenize_to_contexts(texts, model.tokenizer, context_size, max_contexts=n)
    return list(tokens.split(batch))


def _acg_folder(path: str) -> tuple[Path, Path]:
    """(acg folder, reports folder) for an ACG folder or a workspace."""
    p = Path(path).expanduser()
    if (p / "workspace.json").is_file():
        return p / "acg", p / "reports"
    return p, p / "reports"


def _open(path: str):
    from acgraph.graph import load_acg, load_transcoders
    from acgraph.io import read_json
    from acgraph.models import load_model

    folder, reports = _acg_folder(path)
    if not (folder / "manifest.json").is_file():
        raise ArtifactError(f"no ACG at {folder} (run `acg build` first)")
    meta = read_json(folder / "manifest.json")
    model = load_model(meta["model"])
    graph = load_acg(folder, model, load_transcoders(meta["transcoders"]))
    return graph, meta, reports


# ---------------------------------------------------------------- commands


def cmd_build(args: argparse.Namespace) -> int:
    from acgraph.graph import build_acg, load_transcoders
    from acgraph.models import load_model

    _threads(args)
    model_spec, corpus, tc_spec, out = args.model, args.corpus, args.transcoders, args.out
    if args.workspace:
        from acgraph.workspace import Workspace

        ws = Workspace.open(args.workspace)
        model_spec = model_spec or ws.model
        corpus = corpus or ws.corpus
        tc_spec = tc_spec or str(ws.path / "dictionaries")
        out = out or str(ws.path / "acg")
    if not model_spec:
        raise ConfigError("no model: pass --model SPEC or --workspace WS")
    if not corpus:
        raise ConfigError("no corpus: pass --corpus SPEC or a --workspace that has one")
    if not tc_spec:
        raise ConfigError("no transcoders: pass --transcoders DIR (or 'organism') or --workspace")
    if not out:
        raise ConfigError("no output folder: pass --out DIR or --workspace WS")
    if tc_spec != "organism":
        tc_spec = str(Path(tc_spec).expanduser().resolve())
    try:
        fit_ks = [int(x) for x in args.fit_k.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--fit-k takes comma-separated integers, got {args.fit_k!r}") from None
    fit_ks = [k for k in fit_ks if k <= args.max_k]
    if args.max_fanin is not None and args.fit_fanin != "adaptive":
        raise ConfigError("--max-fanin needs --fit-fanin adaptive")
    if args.fit_importance is not None and args.fit_fanin != "adaptive":
        raise ConfigError("--fit-importance needs --fit-fanin adaptive")
    model = load_model(model_spec)
    transcoders = load_transcoders(tc_spec)
    batches = _batches(model, corpus, args.contexts, args.context_size, args.seed, args.batch_size)
    graph = build_acg(
        model,
        transcoders,
        batches,
        max_k=args.max_k,
        max_pairs=args.max_pairs,
        qk=not args.no_qk,
        pair_candidates=args.pair_candidates,
        pair_importance=args.pair_importance,
        fit_ks=fit_ks,
        fit_pool=args.fit_pool,
        fit_fanin=args.fit_fanin,
        max_fanin=args.max_fanin,
        fit_importance=args.fit_importance or "fisher",
        fit_loss=args.fit_loss,
        meta={"model": model_spec, "transcoders": tc_spec, "corpus": corpus, "seed": args.seed},
    )
    sizes = graph.save(out)
    m = graph.meta
    print(
        f"built the ACG of {model_spec} ({m['layout']['n_layers']} layers, "
        f"{sum(m['layout']['d_sae'])} features) in {m['build_seconds']} s from "
        f"{m['stats_positions']} positions: {m['max_k']} in-edges per feature, "
        f"{m['max_pairs']} QK pairs per head"
        f"{' (' + m['pair_importance'] + '-ranked)' if m['max_pairs'] else ''}, "
        f"fitted formulas for k in {m['fit_ks']}"
        f"{' (adaptive fan-in)' if m['fit_fanin'] == 'adaptive' else ''}"
        f"{' (censored)' if m['fit_loss'] == 'censored' else ''}; "
        f"edges {sizes['edges_bytes'] / 1e6:.1f} MB, "
        f"stats {sizes['stats_bytes'] / 1e6:.1f} MB -> {out}"
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import time

    from acgraph.graph.tune import tune_formulas

    _threads(args)
    graph, meta, _ = _open(args.acg)
    if args.contexts < 1:
        raise ConfigError(f"--contexts must be at least 1, got {args.contexts}")
    if args.validation_contexts < 0:
        n = args.validation_contexts
        raise ConfigError(f"--validation-contexts must be 0 or more, got {n}")
    if not 0 <= args.lr_decay <= 1:
        raise ConfigError(f"--lr-decay must be in 0..1, got {args.lr_decay}")
    if args.pairs is not None and not 1 <= args.pairs <= int(meta.get("max_pairs") or 0):
        raise ConfigError(f"--pairs must be in 1..{meta.get('max_pairs') or 0} (stored per head)")
    # the build's own corpus and seed: tuning is part of building, never the held-out text
    seed = int(meta.get("seed", 0))
    batches = _batches(
        graph.weights.model, meta["corpus"], args.contexts, 128, seed, args.batch_size
    )
    held = []  # seed + 1 is `acg faithfulness`'s held-out text; validation never touches it
    if args.validation_contexts:
        held = _batches(
            graph.weights.model, meta["corpus"], args.validation_contexts, 128, seed + 2,
            args.batch_size,
        )  # fmt: skip
    folder, _ = _acg_folder(args.acg)
    start = time.perf_counter()
    validation: list[tuple[int, float]] = []
    layers, heads, losses = tune_formulas(
        graph, args.k, batches, pairs=args.pairs, steps=args.steps, lr=args.lr, rows=args.rows,
        lr_decay=args.lr_decay, seed=args.seed,
        checkpoint=folder / "checkpoints" / f"tune{args.k}.safetensors",
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        validation_batches=held, validate_every=args.validate_every, validation=validation,
    )  # fmt: skip
    graph.tuned[args.k] = (layers, heads)
    tail = losses[-max(1, len(losses) // 20) :]
    info = {
        "pairs": args.pairs,
        "steps": args.steps,
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "rows": args.rows,
        "seed": args.seed,
        "contexts": sum(int(b.shape[0]) for b in batches),
        "kl_first": losses[0],
        "kl_last_5pct": sum(tail) / len(tail),
        "seconds_this_run": round(time.perf_counter() - start, 1),
    }
    if validation:
        info["validation"] = {
            "contexts": sum(int(b.shape[0]) for b in held),
            "every": args.validate_every,
            "kl": [list(sv) for sv in validation],
            "kept_step": min(validation, key=lambda v: v[1])[0],
        }
    graph.meta.setdefault("tuned", {})[str(args.k)] = info
    graph.save(folder, stats=False)  # a tune changes edges only
    level = f"level 3 with {args.pairs} pairs per head" if args.pairs else "level 2"
    kept = ""
    if validation:
        (first, kl_first), (best, kl_best) = validation[0], min(validation, key=lambda v: v[1])
        kept = (
            f"; kept step {best} (validation KL {kl_first:.4f} at step {first}, {kl_best:.4f} kept)"
        )
    print(
        f"tuned the k={args.k} formulas ({level}) in {info['seconds_this_run']} s: training KL "
        f"{info['kl_first']:.4f} -> {info['kl_last_5pct']:.4f} (mean of the last 5%){kept} "
        f"-> {folder}"
    )
    return 0


def cmd_faithfulness(args: argparse.Namespace) -> int:
    from acgraph.graph import format_faithfulness, measure_faithfulness, plot_faithfulness
    from acgraph.io import atomic_write_json

    _threads(args)
    try:
        ks = [int(x) for x in args.k.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--k takes comma-separated integers, got {args.k!r}") from None
    graph, meta, reports = _open(args.acg)
    corpus = args.corpus or meta.get("corpus")
    if not corpus:
        raise ConfigError("no corpus: pass --corpus SPEC")
    # held-out: a different seed from the build's statistics corpus
    seed = args.seed if args.seed else int(meta.get("seed", 0)) + 1
    batches = _batches(graph.weights.model, corpus, args.contexts, 128, seed, args.batch_size)
    pairs = None
    if not args.no_level3 and meta.get("max_pairs"):
        pairs = args.pairs or int(meta["max_pairs"])
    organism_cfg = None
    if meta.get("model") == "organism":
        from acgraph.organism import load_config

        organism_cfg = load_config()
    report = measure_faithfulness(
        graph,
        batches,
        ks=ks,
        pairs=pairs,
        organism_cfg=organism_cfg,
        n_per_domain=args.per_domain,
    )
    report["model"] = meta.get("model")
    report["corpus"] = corpus
    out = Path(args.report) if args.report else reports
    atomic_write_json(out / "faithfulness.json", report)
    plot_faithfulness(report, out / "faithfulness.png")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_faithfulness(report))
        print(f"\nwritten: {out}/faithfulness.json, {out}/faithfulness.png", file=sys.stderr)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from acgraph.graph import explain_feature, parse_feature

    _threads(args)
    layer, fid = parse_feature(args.feature)
    graph, meta, _ = _open(args.acg)
    batches = None
    if args.contexts:
        seed = int(meta.get("seed", 0)) + 1
        batches = _batches(
            graph.weights.model, meta["corpus"], args.contexts, 128, seed, args.batch_size
        )
    info = explain_feature(graph, layer, fid, k=args.k, batches=batches)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(info["formula"])
    for t in info["terms"]:
        print(
            f"  {t['weight']:+8.3f}  {t['source']:<40} mean {t['mean_contribution']:+.3f}  "
            f"score {t['score']:.3f}"
        )
    print(f"  bias {info['bias']:+.3f}, mean of the other edges {info['folded_mean']:+.3f}")
    if "r2" in info:
        r2 = ", ".join(f"k={k}: {v:.3f}" for k, v in info["r2"].items())
        print(f"R² of the top-k formula on held-out data: {r2}")
    return 0
