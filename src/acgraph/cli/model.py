"""`acg model` commands."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("model", help="inspect supported models")
    commands = group.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    info = commands.add_parser(
        "info",
        help="load a model and print its shape, parameter count and hook points",
        description="SPEC: HF hub id, local HF folder, .gguf file, or alias smollm2 / organism.",
    )
    info.add_argument("spec", metavar="SPEC", help="model to load")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    # Imported here so `acg --help` stays fast (torch/transformers take seconds to import).
    from acgraph.models import format_model_info, load_model, model_info, resolve_spec

    resolved = resolve_spec(args.spec)  # fails fast, before the slow imports and weight loading
    print(f"loading {resolved.describe()} ...", file=sys.stderr, flush=True)
    info = model_info(load_model(args.spec, device=args.device))
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))
    return 0
