"""`acg hypothesis fit|test` and `acg coverage`: hypotheses as code, and how much they cover.

acg hypothesis fit --out fitted.py                 (built-in families, the organism by default)
acg hypothesis test FILE.py [FILE.py ...]          (local fidelity, swap costs, verdict)
acg coverage FILE.py [FILE.py ...] [--budget 0.1]  (per layer; "understood up to layer L")

Hypothesis files are Python and run in-process: only the files named on the command line are
loaded. With several files, a later file's hypothesis replaces an earlier one's for the same
target (put hand-written files after fitted ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from acgraph.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hypothesis", help="fit and test hypotheses written as code")
    hsub = p.add_subparsers(dest="hypothesis_command", metavar="ACTION", required=True)

    f = hsub.add_parser("fit", help="fit the built-in families; write them as Python")
    f.add_argument("--out", metavar="FILE.py", required=True, help="Python file to write")
    f.add_argument("--layers", help="comma-separated layers (default: all)")
    f.add_argument("--k", type=int, default=8, help="terms per linear formula (8)")
    f.add_argument(
        "--families", default="token,ngram,position,linear", help="feature families to try"
    )
    f.add_argument("--no-heads", action="store_true", help="features only")
    _subject_args(f, contexts=64, seed=0)
    f.set_defaults(func=cmd_fit)

    t = hsub.add_parser("test", help="local fidelity, swap costs and a verdict")
    _measure_args(t, report="hypothesis_test.json")
    t.add_argument("--swap-each-max", type=int, default=16, help="swap each alone up to N (16)")
    t.add_argument("--per-domain", type=int, default=50, help="organism examples per domain")
    t.set_defaults(func=cmd_test)

    c = sub.add_parser("coverage", help="per-layer understanding coverage of hypothesis files")
    _measure_args(c, report="coverage.json/.md/.png")
    c.add_argument("--budget", type=float, default=0.1, help="ΔCE budget in nats (0.1)")
    c.set_defaults(func=cmd_coverage)


def _subject_args(p: argparse.ArgumentParser, contexts: int, seed: int) -> None:
    p.add_argument("--workspace", metavar="WS", help="model, corpus and transcoders from WS")
    p.add_argument("--model", metavar="SPEC", help="model spec (default: organism)")
    p.add_argument("--transcoders", metavar="DIR", help="MLP transcoders (default: organism)")
    p.add_argument("--corpus", metavar="SPEC", help="text to measure on")
    p.add_argument("--contexts", type=int, default=contexts, help=f"contexts ({contexts})")
    p.add_argument("--seed", type=int, default=seed, help=f"corpus seed ({seed})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward (16)")


def _measure_args(p: argparse.ArgumentParser, report: str) -> None:
    """Options shared by `test` and `coverage`: files, thresholds, report, held-out data."""
    p.add_argument("files", nargs="+", metavar="FILE.py", help="hypothesis files")
    p.add_argument("--max-fvu", type=float, default=0.25, help="local acceptance FVU (0.25)")
    p.add_argument("--max-delta-ce", type=float, default=0.05, help="swap ΔCE accepted (0.05)")
    p.add_argument("--report", metavar="DIR", help=f"write {report} here (default: reports/)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _subject_args(p, contexts=32, seed=1)


def _subject(args: argparse.Namespace):
    """(Subject, held-out batches, reports folder) from the common options."""
    from acgraph.cli.graph import _batches, _threads
    from acgraph.graph import load_transcoders
    from acgraph.hypotheses import Subject
    from acgraph.models import load_model

    _threads(args)
    model_spec, tc_spec, corpus = args.model, args.transcoders, args.corpus
    reports = Path("reports")
    if args.workspace:
        from acgraph.workspace import Workspace

        ws = Workspace.open(args.workspace)
        model_spec = model_spec or ws.model
        tc_spec = tc_spec or str(ws.path / "dictionaries")
        corpus = corpus or ws.corpus
        reports = ws.path / "reports"
    model_spec = model_spec or "organism"
    organism = model_spec == "organism"
    tc_spec = tc_spec or ("organism" if organism else None)
    corpus = corpus or ("organism:trusted" if organism else None)
    if not tc_spec:
        raise ConfigError("no transcoders: pass --transcoders DIR or --workspace WS")
    if not corpus:
        raise ConfigError("no corpus: pass --corpus SPEC or a --workspace that has one")
    organism_cfg = None
    if organism:
        from acgraph.organism import load_config

        organism_cfg = load_config()
    model = load_model(model_spec)
    subject = Subject.build(model, load_transcoders(tc_spec), organism_cfg)
    args.corpus = corpus  # resolved, for reports
    batches = _batches(model, corpus, args.contexts, 128, args.seed, args.batch_size)
    return subject, batches, reports


def _thresholds(args: argparse.Namespace):
    from acgraph.hypotheses import Thresholds

    if args.max_fvu < 0 or args.max_delta_ce < 0:
        raise ConfigError("--max-fvu and --max-delta-ce must be non-negative")
    return Thresholds(max_fvu=args.max_fvu, max_delta_ce=args.max_delta_ce)


def cmd_fit(args: argparse.Namespace) -> int:
    from acgraph.hypotheses.families import FEATURE_FAMILIES, fit_all
    from acgraph.hypotheses.render import render
    from acgraph.io import atomic_write_text

    out = Path(args.out).expanduser()
    if out.suffix != ".py":
        raise ConfigError(f"--out must be a .py file, got {out}")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FEATURE_FAMILIES)
    if unknown or not families:
        raise ConfigError(
            f"unknown families {sorted(unknown)}; known: {', '.join(FEATURE_FAMILIES)}"
        )
    subject, batches, _ = _subject(args)
    layers = _layers(args.layers, len(subject.transcoders))
    fitted = fit_all(
        subject, batches, layers=layers, k=args.k, families=families, heads=not args.no_heads
    )
    header = (
        f"Built-in hypotheses fitted by `acg hypothesis fit` on {args.contexts} contexts of "
        f"{args.corpus} (seed {args.seed}) for {args.model or 'organism'}.\n\n"
        "Edit freely and re-test with `acg hypothesis test`. `val_fvu` is the fraction of the\n"
        "target's variance left unexplained on the validation contexts when fitted.\n"
    )
    atomic_write_text(out, render(fitted, subject.vocab, header))
    counts: dict[str, int] = {}
    for f in fitted:
        counts[f.family] = counts.get(f.family, 0) + 1
    good = sum(f.fvu <= 0.25 for f in fitted)
    by_family = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
        f"fitted {len(fitted)} hypotheses ({by_family}); {good} with validation FVU <= 0.25 "
        f"-> {out}"
    )
    return 0


def _layers(spec: str | None, n_layers: int) -> list[int]:
    if not spec:
        return list(range(n_layers))
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers takes comma-separated integers, got {spec!r}") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has {n_layers} transcoder layers")
    return layers


def _check(hyps: dict, subject: Any) -> dict:
    """Refuse targets the model does not have (before anything runs)."""
    for t in hyps:
        if t.layer >= len(subject.transcoders):
            raise ConfigError(f"hypothesis target {t} is past the model's last transcoder layer")
        if t.kind == "feature" and t.index >= subject.transcoders[t.layer].d_sae:
            raise ConfigError(
                f"hypothesis target {t}: layer {t.layer} has only "
                f"{subject.transcoders[t.layer].d_sae} features"
            )
        if t.kind == "pattern" and t.index >= subject.model.cfg.n_heads:
            raise ConfigError(
                f"hypothesis target {t}: the model has {subject.model.cfg.n_heads} heads"
            )
    return hyps


def cmd_test(args: argparse.Namespace) -> int:
    from acgraph.hypotheses import evaluate_hypotheses, format_test, load_hypotheses
    from acgraph.io import atomic_write_json

    th = _thresholds(args)
    hyps = load_hypotheses(args.files)  # bad files fail before the model loads
    subject, batches, reports = _subject(args)
    _check(hyps, subject)
    report = evaluate_hypotheses(
        subject,
        hyps,
        batches,
        thresholds=th,
        swap_each_max=args.swap_each_max,
        n_per_domain=args.per_domain if subject.organism_cfg is not None else 0,
    )
    out = Path(args.report) if args.report else reports
    atomic_write_json(out / "hypothesis_test.json", report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_test(report))
        print(f"\nwritten: {out}/hypothesis_test.json", file=sys.stderr)
    return 0 if report["accepted"] else 1


def cmd_coverage(args: argparse.Namespace) -> int:
    from acgraph.hypotheses import load_hypotheses
    from acgraph.hypotheses.coverage import coverage, format_coverage, plot_coverage
    from acgraph.io import atomic_write_json, atomic_write_text

    th = _thresholds(args)
    if args.budget < 0:
        raise ConfigError(f"--budget must be non-negative, got {args.budget}")
    hyps = load_hypotheses(args.files)
    subject, batches, reports = _subject(args)
    _check(hyps, subject)
    report = coverage(subject, hyps, batches, thresholds=th, budget=args.budget)
    out = Path(args.report) if args.report else reports
    text = format_coverage(report)
    atomic_write_json(out / "coverage.json", report)
    atomic_write_text(out / "coverage.md", text)
    plot_coverage(report, out / "coverage.png")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(text)
        print(f"written: {out}/coverage.json, coverage.md, coverage.png", file=sys.stderr)
    return 0
