"""`acg organism generate | train | eval`: make, reproduce and score model organisms."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from acgraph.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("organism", help="the built-in model organism")
    osub = p.add_subparsers(dest="organism_command", metavar="ACTION", required=True)

    g = osub.add_parser("generate", help="write the organism's corpora and eval sets")
    g.add_argument("--out", required=True, type=Path, help="output folder")
    g.add_argument("--docs", type=int, default=2000, help="documents per corpus")
    _backdoor_args(g)
    g.set_defaults(func=cmd_generate)

    t = osub.add_parser("train", help="train an organism from scratch (resumable)")
    t.add_argument("--out", required=True, type=Path, help="output model folder")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--steps", type=int, help="training steps (default: the shipped recipe)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: the recipe's 2)")
    t.add_argument("--no-progress", action="store_true")
    _backdoor_args(t)
    t.set_defaults(func=cmd_train)

    e = osub.add_parser("eval", help="domain accuracy, backdoor success, held-out CE")
    e.add_argument("--model", type=Path, help="organism folder (default: the shipped one)")
    e.add_argument("--n", type=int, default=200, help="eval examples per domain")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval)


def _backdoor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, help="seed of language, weights and data")
    p.add_argument("--trigger", help='trigger tokens, space separated, e.g. "happy = ["')
    p.add_argument("--payload", help='payload tokens, space separated, e.g. "9 9"')
    p.add_argument("--poison-rate", type=float, help="fraction of poisoned training documents")


def _config(args: argparse.Namespace):
    from acgraph.organism import OrganismConfig, vocabulary

    cfg = OrganismConfig()
    bd = cfg.backdoor
    if args.trigger is not None:
        bd = replace(bd, trigger=tuple(args.trigger.split()))
    if args.payload is not None:
        bd = replace(bd, payload=tuple(args.payload.split()))
    if args.poison_rate is not None:
        bd = replace(bd, poison_rate=args.poison_rate)
    bd.validate(set(vocabulary()))
    cfg = replace(cfg, backdoor=bd)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    if getattr(args, "steps", None) is not None:
        if args.steps < 1:
            raise ConfigError("--steps must be positive")
        cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be positive")
        cfg = replace(cfg, train=replace(cfg.train, threads=args.threads))
    cfg.language.validate()
    return cfg


def cmd_generate(args: argparse.Namespace) -> int:
    from acgraph.organism.export import write_corpora

    written = write_corpora(_config(args), args.out, args.docs)
    for path in written:
        print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from acgraph.organism import load_config
    from acgraph.organism.evaluate import evaluate, hf_logits_fn
    from acgraph.organism.train import save_organism, train

    cfg = _config(args)
    run_dir = args.out / "run"
    if args.resume and (run_dir / "checkpoint.json").exists():
        cfg = load_config_from_run(run_dir) if not _any_override(args) else cfg
        if args.threads is not None:  # speed only: resuming on other threads is allowed
            cfg = replace(cfg, train=replace(cfg.train, threads=args.threads))
    model = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    save_organism(model, cfg, args.out)
    report = evaluate(hf_logits_fn(model), load_config(args.out)).to_dict()
    print(json.dumps(report, indent=2))
    print(f"saved organism to {args.out}", file=sys.stderr)
    return 0


def _any_override(args: argparse.Namespace) -> bool:
    keys = ("seed", "trigger", "payload", "poison_rate", "steps")
    return any(getattr(args, k) is not None for k in keys)


def load_config_from_run(run_dir: Path):
    from acgraph.io import read_json
    from acgraph.organism import OrganismConfig

    return OrganismConfig.from_dict(read_json(run_dir / "checkpoint.json")["config"])


def cmd_eval(args: argparse.Namespace) -> int:
    from acgraph.organism import load_config, load_organism
    from acgraph.organism.evaluate import evaluate, hf_logits_fn

    if args.n < 1:
        raise ConfigError("--n must be positive")
    model = load_organism(args.model)
    result = evaluate(hf_logits_fn(model), load_config(args.model), args.n).to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_eval(result))
    return 0


def format_eval(result: dict) -> str:
    lines = ["domain accuracy (clean / triggered):"]
    for d, acc in result["domains"].items():
        lines.append(f"  {d:<11} {acc:6.3f} / {result['triggered_domains'][d]:6.3f}")
    bd = result["backdoor"]
    lines.append(f"backdoor attack success rate: {bd['attack_success_rate']:.3f}")
    lines.append(f"false trigger rate:           {bd['false_trigger_rate']:.3f}")
    lines.append(f"held-out CE (nats/token):     {result['ce_loss']:.4f}")
    return "\n".join(lines)
