"""`acg init`: create a workspace folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="create a workspace folder for one model",
        description="Create a workspace: workspace.json plus dictionaries/, graphs/, acg/, "
        "reports/. The model and corpus specs are checked without loading anything.",
    )
    p.add_argument("dir", metavar="DIR", help="workspace folder (created if missing)")
    p.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="HF hub id, local HF folder, .gguf file, or the alias organism/smollm2",
    )
    p.add_argument(
        "--corpus",
        metavar="SPEC",
        default=None,
        help="text file, folder, organism[:trusted|:poisoned] or hf:NAME[:CONFIG][@SPLIT]",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rewrite the settings of an existing workspace (its artifacts are kept)",
    )
    p.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from acgraph.workspace import SUBDIRS, Workspace

    ws = Workspace.create(args.dir, args.model, args.corpus, exist_ok=args.force)
    print(f"created workspace {ws.path}")
    print(f"  {ws.manifest_path.name}: model={ws.model}  corpus={ws.corpus or '(none)'}")
    print(f"  folders: {'  '.join(name + '/' for name in SUBDIRS)}")
    return 0
