"""`acg demo`: run every stage that exists end to end on the built-in organism."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the built-in organism")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="results folder")
    p.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 loading stage")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from acgraph.demo import run_demo
    from acgraph.graph import format_faithfulness

    from .dictionaries import format_eval_report
    from .organism import format_eval

    summary = run_demo(
        args.out, smollm2=not args.no_smollm2, log=lambda m: print(m, file=sys.stderr)
    )
    org = summary["organism"]
    m = org["model"]
    print(
        f"\n== organism: {m.get('architecture')} ({m.get('n_layers')} layers, "
        f"d_model {m.get('d_model')}, {m.get('n_params', 0):,} parameters)"
    )
    print(
        f"HookedTransformer vs HF max |log-prob diff|: {org['hooked_vs_hf_max_logprob_diff']:.2e}"
    )
    print(format_eval(org["eval"]))
    print("\n== shipped transcoders spliced into the organism (held-out text)")
    print(format_eval_report(summary["dictionaries"]))
    print("\n== runnable ACG of the organism vs the original model (held-out text)")
    print(format_faithfulness(summary["graph"]))
    from acgraph.hypotheses.coverage import format_coverage

    for name, report in summary["hypotheses"].items():
        if isinstance(report, dict):
            print(f"\n== hypotheses as code ({name}): understanding coverage of the organism")
            print(format_coverage(report).strip())
    from acgraph.safety.detect_eval import format_report

    print("\n== anomalous computation: detectors fitted on trusted text only (organism)")
    print(format_report(summary["detect"]))
    from .safety import format_clean_table

    c = summary["clean"]
    print("\n== backdoor removal with trusted data only, then compiled (organism)")
    print(format_clean_table(c["rows"]))
    a, b = c["compiled_vs_cleaned"], c["bounds_on_fresh_trusted_text"]
    print(
        f"on fresh trusted text, compiled vs the cleaned ACG: top-1 {a['top1_agreement']:.4f}, "
        f"KL {a['kl']:.1e} ({c['parameters']:,} parameters); the attention mask itself: top-1 "
        f"{b['top1_agreement']:.4f}, KL {b['kl']:.1e}. Attention bounds: {c['attention_bounds']}"
    )
    if "smollm2" in summary:
        s = summary["smollm2"]
        print(f"\n== SmolLM2-135M-Instruct (GGUF, loaded offline in {s['load_seconds']} s)")
        print(f"{s['prompt']!r} -> {s['greedy_continuation']!r}")
    print(
        f"\nresults written to {args.out}/: summary.json, organism_eval.json, "
        "dictionaries_eval.json, faithfulness.json, faithfulness.png, acg/, "
        "hypotheses_fitted.py, coverage*.json/.md/.png, detect_report.json, clean/, compiled/, "
        "clean_report.json"
    )
    return 0
