"""The `acg` command: a thin layer over the library. One module per command group."""

from __future__ import annotations

import argparse
import sys

from acgraph import __version__
from acgraph.errors import ACGError

from . import (
    attribute,
    demo,
    detect,
    dictionaries,
    graph,
    hypotheses,
    model,
    organism,
    safety,
    workspace,
)

GROUPS = (
    model,
    organism,
    workspace,
    dictionaries,
    graph,
    attribute,
    hypotheses,
    safety,
    detect,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"acgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ACGError as err:
        print(f"acg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("acg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
