"""Tests for acgraph.workspace and `acg init`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import acgraph.models
import acgraph.workspace as ws_mod
from acgraph import __version__
from acgraph.cli import main
from acgraph.errors import ArtifactError, CorpusError, ModelLoadError
from acgraph.workspace import Workspace


@pytest.fixture(autouse=True)
def resolve_spec(monkeypatch):
    """Use the real acgraph.models.resolve_spec; stand in for it only while it is missing."""
    if hasattr(acgraph.models, "resolve_spec"):
        return
    try:
        from acgraph.models.spec import resolve_spec as real
    except ImportError:

        def real(spec: str):
            path = Path(spec)
            if spec.startswith(("/", ".")) and not path.exists():
                raise ModelLoadError(f"model path does not exist: {spec}")
            return spec

    monkeypatch.setattr(acgraph.models, "resolve_spec", real, raising=False)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A local HF model folder (config.json only: specs are checked, never loaded)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("some text\n")
    return f


def test_create_and_open(tmp_path, model_dir, corpus_file):
    root = tmp_path / "ws"
    ws = Workspace.create(root, str(model_dir), str(corpus_file))
    meta = json.loads((root / "workspace.json").read_text())
    assert meta["format_version"] == 1
    assert meta["acgraph_version"] == __version__
    assert meta["model"] == str(model_dir.resolve())
    assert meta["corpus"] == str(corpus_file.resolve())
    assert set(meta) == {
        "format_version",
        "acgraph_version",
        "model",
        "corpus",
        "created",
        "updated",
    }
    assert meta["created"] == meta["updated"]
    for name in ("dictionaries", "graphs", "acg", "reports"):
        assert (root / name).is_dir()
    assert ws.dictionaries_dir == root / "dictionaries"
    assert ws.graphs_dir == root / "graphs"
    assert ws.acg_dir == root / "acg"
    assert ws.reports_dir == root / "reports"

    opened = Workspace.open(root)
    assert opened.meta == meta
    assert opened.model == str(model_dir.resolve())
    assert opened.corpus == str(corpus_file.resolve())
    assert not list(root.glob(".*.tmp"))  # atomic write left no temp file


def test_relative_paths_stored_absolute(tmp_path, model_dir, corpus_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ws = Workspace.create("ws", "model", "corpus.txt")
    assert ws.model == str(model_dir.resolve())
    assert ws.corpus == str(corpus_file.resolve())


def test_hub_id_and_builtin_corpus_kept_verbatim(tmp_path):
    ws = Workspace.create(tmp_path / "ws", "HuggingFaceTB/SmolLM2-135M", "organism:poisoned")
    assert ws.model == "HuggingFaceTB/SmolLM2-135M"
    assert ws.corpus == "organism:poisoned"
    assert Workspace.create(tmp_path / "ws2", "gpt2", None).corpus is None


def test_refuse_overwrite_unless_exist_ok(tmp_path, model_dir, corpus_file, monkeypatch):
    root = tmp_path / "ws"
    monkeypatch.setattr(ws_mod, "_now", lambda: "2030-01-01T00:00:00+00:00")
    Workspace.create(root, str(model_dir))
    (root / "dictionaries" / "keep.txt").write_text("artifact")
    with pytest.raises(ArtifactError, match="already exists"):
        Workspace.create(root, str(model_dir), str(corpus_file))
    assert Workspace.open(root).corpus is None

    monkeypatch.setattr(ws_mod, "_now", lambda: "2031-01-01T00:00:00+00:00")
    ws = Workspace.create(root, "gpt2", str(corpus_file), exist_ok=True)
    assert ws.model == "gpt2"
    assert ws.corpus == str(corpus_file.resolve())
    assert ws.created == "2030-01-01T00:00:00+00:00"
    assert ws.updated == "2031-01-01T00:00:00+00:00"
    assert (root / "dictionaries" / "keep.txt").read_text() == "artifact"


def test_bad_specs_fail_before_writing(tmp_path, corpus_file):
    root = tmp_path / "ws"
    with pytest.raises(ModelLoadError):
        Workspace.create(root, str(tmp_path / "no-such-model"), str(corpus_file))
    with pytest.raises(CorpusError):
        Workspace.create(root, "gpt2", str(tmp_path / "no-such-corpus.txt"))
    with pytest.raises(CorpusError):
        Workspace.create(root, "gpt2", "organism:typo")
    assert not root.exists()


def test_create_on_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        Workspace.create(f, "gpt2")


def test_open_missing(tmp_path):
    with pytest.raises(ArtifactError) as info:
        Workspace.open(tmp_path)
    assert str(info.value) == f"not an acgraph workspace: {tmp_path} (run `acg init`)"


def test_open_wrong_version(tmp_path):
    Workspace.create(tmp_path, "gpt2")
    meta = json.loads((tmp_path / "workspace.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "workspace.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format_version 99"):
        Workspace.open(tmp_path)


def test_open_malformed(tmp_path):
    (tmp_path / "workspace.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable JSON"):
        Workspace.open(tmp_path)
    (tmp_path / "workspace.json").write_text(json.dumps({"format_version": 1, "model": 3}))
    with pytest.raises(ArtifactError, match="'model'"):
        Workspace.open(tmp_path)


def test_touch_updates_timestamp(tmp_path, monkeypatch):
    monkeypatch.setattr(ws_mod, "_now", lambda: "2030-01-01T00:00:00+00:00")
    ws = Workspace.create(tmp_path, "gpt2")
    monkeypatch.setattr(ws_mod, "_now", lambda: "2030-06-01T12:00:00+00:00")
    ws.touch()
    reopened = Workspace.open(tmp_path)
    assert reopened.updated == "2030-06-01T12:00:00+00:00"
    assert reopened.created == "2030-01-01T00:00:00+00:00"


# ---------------------------------------------------------------- CLI


def test_cli_init(tmp_path, model_dir, corpus_file, capsys):
    root = tmp_path / "ws"
    rc = main(["init", str(root), "--model", str(model_dir), "--corpus", str(corpus_file)])
    assert rc == 0
    meta = json.loads((root / "workspace.json").read_text())
    assert meta["model"] == str(model_dir.resolve())
    assert meta["corpus"] == str(corpus_file.resolve())
    out = capsys.readouterr().out
    assert str(root) in out and "dictionaries/" in out

    rc = main(["init", str(root), "--model", "gpt2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["init", str(root), "--model", "gpt2", "--force"]) == 0
    assert json.loads((root / "workspace.json").read_text())["model"] == "gpt2"


def test_cli_init_bad_model_path(tmp_path, capsys):
    root = tmp_path / "ws"
    rc = main(["init", str(root), "--model", str(tmp_path / "no-such-model")])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("acg: error: ")
    assert captured.err.count("\n") == 1
    assert "no-such-model" in captured.err
    assert not (root / "workspace.json").exists()
