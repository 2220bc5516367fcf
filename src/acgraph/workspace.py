"""A workspace: the folder that holds every artifact of one model (see DESIGN.md, "Artifacts").

    ws/
      workspace.json    {format_version, acgraph_version, model, corpus, created, updated}
      dictionaries/     SAEs / transcoders, one folder per hook
      graphs/           local attribution graphs
      acg/              the global graph
      reports/          evaluations

Local model and corpus paths are stored absolute, so a workspace works from any directory.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from acgraph.errors import ACGError, ArtifactError, ModelLoadError
from acgraph.io import atomic_write_json, read_json

FORMAT_VERSION = 1
MANIFEST = "workspace.json"
SUBDIRS = ("dictionaries", "graphs", "acg", "reports")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _normalize_model_spec(model: str) -> str:
    """Validate a model spec cheaply (no weights loaded); make local paths absolute."""
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError("empty model spec")
    from acgraph.models import resolve_spec

    resolved = resolve_spec(model)
    is_local = getattr(resolved, "is_local", False)
    if is_local and getattr(resolved, "alias", None) is None:
        return str(Path(model.strip()).expanduser().resolve())
    return model.strip()


class Workspace:
    """An acgraph workspace folder. Build one with :meth:`create` or :meth:`open`."""

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = meta

    # ------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        path: str | Path,
        model: str,
        corpus: str | None = None,
        *,
        exist_ok: bool = False,
    ) -> Workspace:
        """Make a workspace at ``path`` (the folder may exist; a workspace there may not).

        The model spec is validated with :func:`acgraph.models.resolve_spec` and the corpus spec
        with :func:`acgraph.data.check_corpus_spec`, both without loading anything heavy. With
        ``exist_ok`` an existing workspace gets the new specs (its ``created`` time and its
        artifacts are kept).
        """
        from acgraph import __version__
        from acgraph.data.corpus import check_corpus_spec

        path = Path(path).expanduser()
        manifest = path / MANIFEST
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"cannot create a workspace: {path} is a file")
        created = None
        if manifest.exists():
            if not exist_ok:
                raise ArtifactError(
                    f"a workspace already exists at {path} (use --force / exist_ok=True to "
                    "overwrite its settings)"
                )
            try:
                old = read_json(manifest)
                if isinstance(old, dict) and isinstance(old.get("created"), str):
                    created = old["created"]
            except ACGError:
                pass

        model = _normalize_model_spec(model)
        corpus = None if corpus is None else check_corpus_spec(corpus)

        now = _now()
        meta = {
            "format_version": FORMAT_VERSION,
            "acgraph_version": __version__,
            "model": model,
            "corpus": corpus,
            "created": created or now,
            "updated": now,
        }
        for name in SUBDIRS:
            (path / name).mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, meta)
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        """Read and validate ``path/workspace.json``."""
        path = Path(path).expanduser()
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise ArtifactError(f"not an acgraph workspace: {path} (run `acg init`)")
        meta = read_json(manifest)
        if not isinstance(meta, dict):
            raise ArtifactError(f"malformed {manifest}: expected a JSON object")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{manifest} has format_version {version!r}; this acgraph reads version "
                f"{FORMAT_VERSION}"
            )
        if not isinstance(meta.get("model"), str) or not meta["model"]:
            raise ArtifactError(f"malformed {manifest}: 'model' must be a non-empty string")
        if meta.get("corpus") is not None and not isinstance(meta["corpus"], str):
            raise ArtifactError(f"malformed {manifest}: 'corpus' must be a string or null")
        return cls(path, meta)

    # ------------------------------------------------------------ fields

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def corpus(self) -> str | None:
        return self.meta.get("corpus")

    @property
    def created(self) -> str | None:
        return self.meta.get("created")

    @property
    def updated(self) -> str | None:
        return self.meta.get("updated")

    @property
    def dictionaries_dir(self) -> Path:
        return self.path / "dictionaries"

    @property
    def graphs_dir(self) -> Path:
        return self.path / "graphs"

    @property
    def acg_dir(self) -> Path:
        return self.path / "acg"

    @property
    def reports_dir(self) -> Path:
        return self.path / "reports"

    # ------------------------------------------------------------ updates

    def touch(self) -> None:
        """Set ``updated`` to now and rewrite workspace.json atomically."""
        self.meta["updated"] = _now()
        atomic_write_json(self.manifest_path, self.meta)

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r}, model={self.model!r}, corpus={self.corpus!r})"
