"""`acg detect fit` / `acg detect score`: flag inputs whose features were computed unusually.

acg detect fit --out DET [--docs 2048] [--k 128]         (trusted organism text only)
acg detect fit --out DET --model ORGANISM_DIR --transcoders TC_DIR   (an organism variant)
acg detect score DET [--per-domain 50] [--attack 8] [--report DIR] [--json]

The organism's configuration (language, trigger, payload) is read from its folder
(``organism.json``, written by ``acg organism train``): the fit uses its trusted text only; the
evaluation uses its trigger.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from acgraph.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="anomalous-computation detector (fit / score)")
    dsub = p.add_subparsers(dest="detect_command", metavar="ACTION", required=True)

    f = dsub.add_parser("fit", help="fit the detector and baselines on trusted organism text")
    f.add_argument("--out", metavar="DIR", required=True, help="output folder")
    f.add_argument(
        "--model",
        default="organism",
        help="'organism' (shipped) or a folder written by `acg organism train`",
    )
    f.add_argument(
        "--transcoders",
        default=None,
        help="MLP transcoders of that model (default: the shipped ones, for 'organism' only)",
    )
    f.add_argument(
        "--docs", type=int, default=None, help="trusted documents (2048, chosen on validation)"
    )
    f.add_argument("--k", type=int, default=128, help="in-edges modelled per feature (128)")
    f.add_argument("--seed", type=int, default=0, help="trusted corpus seed (0)")
    f.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    f.set_defaults(func=cmd_fit)

    s = dsub.add_parser("score", help="evaluate every detector on held-out organism inputs")
    s.add_argument("detector", metavar="DIR", help="folder written by `acg detect fit`")
    s.add_argument("--per-domain", type=int, default=50, help="test inputs per domain (50)")
    s.add_argument("--mixed", type=int, default=100, help="mixed-domain inputs (100)")
    s.add_argument("--attack", type=int, default=0, help="inputs to attack per detector (0)")
    s.add_argument("--attack-steps", type=int, default=12, help="greedy steps per input (12)")
    s.add_argument("--report", metavar="DIR", help="write detect_report.json here")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    s.set_defaults(func=cmd_score)


def _load(model_spec: str, transcoders: str | None, threads: int):
    """(model, transcoders, organism config) of the shipped organism or a trained variant."""
    import torch

    from acgraph.graph import load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import load_config

    if model_spec == "organism":
        config = load_config()
    else:
        folder = Path(model_spec)
        if not (folder / "organism.json").is_file():
            raise ConfigError(
                f"--model must be 'organism' or a folder written by `acg organism train` "
                f"(no organism.json in {folder})"
            )
        config = load_config(folder)
        if transcoders is None:
            raise ConfigError("--transcoders is required with an organism folder")
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(0)
    return load_model(model_spec), load_transcoders(transcoders or "organism"), config


def cmd_fit(args: argparse.Namespace) -> int:
    from acgraph.safety.detect import fit_detectors
    from acgraph.safety.detect_eval import TRUSTED_DOCS, trusted_batches

    args.docs = TRUSTED_DOCS if args.docs is None else args.docs
    if args.docs < 1:
        raise ConfigError(f"--docs must be at least 1, got {args.docs}")
    if args.k < 1:
        raise ConfigError(f"--k must be at least 1, got {args.k}")
    model, tcs, config = _load(args.model, args.transcoders, args.threads)
    batches = trusted_batches(args.docs, seed=args.seed, config=config)
    det = fit_detectors(model, tcs, batches, k=args.k)
    spec = lambda s: s if s == "organism" else str(Path(s).resolve())  # noqa: E731
    det.meta.update(
        model=spec(args.model),
        transcoders=spec(args.transcoders or "organism"),
        corpus="organism:trusted",
        docs=args.docs,
        seed=args.seed,
    )
    path = det.save(args.out)
    print(f"detector fitted on {det.edge.n_positions} trusted positions -> {path.parent}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from acgraph.io import atomic_write_json, read_json
    from acgraph.safety.detect import load_detectors
    from acgraph.safety.detect_eval import evaluate_detectors, format_report

    if args.per_domain < 2:
        raise ConfigError(f"--per-domain must be at least 2, got {args.per_domain}")
    folder = Path(args.detector)
    if not folder.is_dir():
        raise ConfigError(f"no detector folder at {folder}")
    if not (folder / "detector.json").is_file():  # checked before the (slow) model load
        raise ConfigError(f"{folder} holds no detector (detector.json missing)")
    meta = read_json(folder / "detector.json")
    model, tcs, config = _load(meta.get("model", "organism"), meta.get("transcoders"), args.threads)
    det = load_detectors(folder, model, tcs)
    report = evaluate_detectors(
        det,
        config,
        n_per_domain=args.per_domain,
        n_mixed=args.mixed,
        attack_n=args.attack,
        attack_steps=args.attack_steps,
    )
    if args.report:
        atomic_write_json(Path(args.report) / "detect_report.json", report)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
