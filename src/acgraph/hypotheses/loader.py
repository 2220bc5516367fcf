"""Load hypothesis files. They are Python and run in-process, so only paths the user names are
ever loaded: nothing is discovered or imported implicitly."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

from acgraph.errors import ConfigError

from .core import _REGISTRY, Hypothesis, Target


def load_file(path: str | Path) -> list[Hypothesis]:
    """Every hypothesis a file defines (decorated functions and ``zero(...)`` calls), in
    definition order."""
    path = Path(path).expanduser()
    if path.suffix != ".py":
        raise ConfigError(f"hypothesis files are Python (.py): {path}")
    if not path.is_file():
        raise ConfigError(f"no such hypothesis file: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"acgraph_hypotheses_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load hypothesis file {path}")
    module = importlib.util.module_from_spec(spec)
    found: list[Hypothesis] = []
    token = _REGISTRY.set(found)
    sys.modules[name] = module  # dataclasses and pickling need the module to be importable
    try:
        spec.loader.exec_module(module)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except Exception as err:  # user code: report it in one line
        line = _user_line(err, path)
        raise ConfigError(f"{path}{line}: {type(err).__name__}: {err}") from None
    finally:
        _REGISTRY.reset(token)
        sys.modules.pop(name, None)
    for h in found:
        h.source = str(path)
    if not found:
        raise ConfigError(f"{path} defines no hypotheses (use @feature, @head or @component)")
    return found


def _user_line(err: BaseException, path: Path) -> str:
    tb = err.__traceback__
    line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f":{line}" if line else ""


def load_hypotheses(paths: Iterable[str | Path]) -> dict[Target, Hypothesis]:
    """Hypotheses of several files by target; a later file's hypothesis replaces an earlier
    one for the same target (so hand-written files go after fitted ones)."""
    out: dict[Target, Hypothesis] = {}
    for p in paths:
        for h in load_file(p):
            out[h.target] = h
    if not out:
        raise ConfigError("no hypothesis files given")
    return out
