"""`acg build`, `acg faithfulness`, `acg explain-feature` end to end, and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from acgraph.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("acg") / "graph"
    argv = [
        "build", "--model", "organism", "--transcoders", "organism", "--corpus",
        "organism:poisoned", "--contexts", "4", "--max-k", "8", "--max-pairs", "256",
        "--batch-size", "4", "--fit-k", "8", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_build_writes_a_versioned_manifest(built):
    meta = json.loads((built / "manifest.json").read_text())
    assert meta["format_version"] == 1
    assert meta["model"] == "organism" and meta["transcoders"] == "organism"
    assert meta["max_k"] == 8 and meta["max_pairs"] == 256 and meta["fit_ks"] == [8]
    assert meta["layout"]["n_layers"] == 3 and meta["stats_contexts"] == 4
    assert meta["pair_importance"] == "attribution"
    assert meta["sizes"]["edges_bytes"] == (built / "edges.safetensors").stat().st_size


def test_faithfulness_cli_writes_json_and_png(built, tmp_path, capsys):
    argv = [
        "faithfulness", str(built), "--contexts", "2", "--k", "1,8", "--per-domain", "4",
        "--report", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "level" in out and "CE rec." in out
    assert "3: QK pairs per head, the top ones by attribution" in out
    report = json.loads((tmp_path / "faithfulness.json").read_text())
    assert report["pair_importance"] == "attribution"
    assert [(r["level"], r["k"]) for r in report["rows"]] == [
        ("1", "all"), ("2", 1), ("2", 8), ("2", 8), ("3", 1), ("3", 8), ("3", 8), ("3", "all"),
    ]  # fmt: skip
    assert set(report["organism_original"]["domains"]) == {
        "arithmetic", "brackets", "lookup", "agreement",
    }  # fmt: skip
    # every accuracy comes with its binomial standard error over the 4 prompts per domain
    scores = [report["organism_original"], *(r["organism"] for r in report["rows"])]
    for sc in scores:
        assert sc["n_per_domain"] == 4
        expect = {d: (p * (1 - p) / 4) ** 0.5 for d, p in sc["domains"].items()}
        assert sc["domains_stderr"] == pytest.approx(expect)
    worst = max(se for sc in scores for se in sc["domains_stderr"].values())
    assert f"(4 prompts each, standard error at most {worst:.3f})" in out
    assert (tmp_path / "faithfulness.png").stat().st_size > 0


def test_tune_cli_adds_tuned_rows(built, tmp_path, capsys):
    import shutil

    graph = tmp_path / "graph"
    shutil.copytree(built, graph)  # the module's graph stays untuned for the other tests
    stats_before = (graph / "stats.safetensors").stat()
    argv = ["tune", str(graph), "--k", "8", "--pairs", "64", "--steps", "3", "--contexts", "4"]
    assert main([*argv, "--rows", "2", "--batch-size", "4", "--lr-decay", "0.25"]) == 0
    stats_after = (graph / "stats.safetensors").stat()  # a tune leaves the statistics alone
    assert (stats_after.st_ino, stats_after.st_mtime_ns) == (
        stats_before.st_ino, stats_before.st_mtime_ns,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "tuned the k=8 formulas (level 3 with 64 pairs per head)" in out
    assert "kept step" in out
    meta = json.loads((graph / "manifest.json").read_text())
    assert meta["tuned"]["8"]["pairs"] == 64 and meta["tuned"]["8"]["steps"] == 3
    assert meta["tuned"]["8"]["lr_decay"] == 0.25
    validation = meta["tuned"]["8"]["validation"]
    assert validation["contexts"] == 32 and [s for s, _ in validation["kl"]] == [0, 3]
    assert validation["kept_step"] == min(validation["kl"], key=lambda sv: sv[1])[0]
    argv = ["faithfulness", str(graph), "--contexts", "2", "--k", "8", "--per-domain", "2"]
    assert main([*argv, "--report", str(tmp_path / "r")]) == 0
    assert "2t/3t: tuned formulas" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "faithfulness.json").read_text())
    assert [(r["level"], r["pairs"]) for r in report["rows"] if r["tuned"]] == [
        ("2", None), ("3", 64),
    ]  # fmt: skip


def _tune_briefly(built, folder, *extra: str) -> tuple[torch.Tensor, dict]:
    """Tune a copy of the module's graph for 2 steps; its tuned layer-2 weights and manifest
    entry."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(built, folder)
    argv = ["tune", str(folder), "--k", "8", "--steps", "2", "--contexts", "8", "--rows", "2"]
    assert main([*argv, "--validation-contexts", "0", "--batch-size", "4", *extra]) == 0
    meta = json.loads((folder / "manifest.json").read_text())["tuned"]["8"]
    return load_file(folder / "edges.safetensors")["tune8.L2.weight"], meta


def test_tune_seed_draws_other_contexts(built, tmp_path):
    """``acg tune --seed`` changes the contexts each step draws (the corpus stays the build's),
    so two seeds train different weights; the manifest records it."""
    w0, meta0 = _tune_briefly(built, tmp_path / "seed0", "--seed", "0")
    w1, meta1 = _tune_briefly(built, tmp_path / "seed1", "--seed", "1")
    assert (meta0["seed"], meta1["seed"]) == (0, 1)
    assert not torch.equal(w0, w1)


def test_tune_lr_decay_reaches_the_optimizer(built, tmp_path):
    """A full decay halves the second of two steps' rate: other weights than a constant rate
    from the same contexts; the default (0.5) is recorded."""
    constant, meta = _tune_briefly(built, tmp_path / "constant", "--lr-decay", "0")
    decayed, _ = _tune_briefly(built, tmp_path / "decayed", "--lr-decay", "1")
    _, default = _tune_briefly(built, tmp_path / "default")
    assert meta["lr_decay"] == 0 and default["lr_decay"] == 0.5
    assert not torch.equal(constant, decayed)


def test_build_with_adaptive_fanin(tmp_path, capsys):
    argv = [
        "build", "--model", "organism", "--transcoders", "organism", "--corpus",
        "organism:poisoned", "--contexts", "4", "--max-k", "16", "--no-qk", "--batch-size", "4",
        "--fit-k", "4", "--fit-fanin", "adaptive", "--max-fanin", "12", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "fitted formulas for k in [4] (adaptive fan-in)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "manifest.json").read_text())
    assert meta["fit_fanin"] == "adaptive" and meta["max_fanin"] == 12
    assert meta["fit_importance"] == "fisher" and meta["pair_importance"] is None  # --no-qk
    assert meta["fit_loss"] == "squared"
    assert meta["fit_mean_edges"]["4"] == 4.0
    argv = ["faithfulness", str(tmp_path), "--contexts", "2", "--k", "4", "--per-domain", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "k in-edges per feature on average over each layer" in out
    report = json.loads((tmp_path / "reports" / "faithfulness.json").read_text())
    assert report["fit_fanin"] == "adaptive" and report["fit_importance"] == "fisher"
    assert "errors priced by fisher" in out
    fitted = [r["in_edges"] for r in report["rows"] if r["fitted"]]
    assert fitted == [pytest.approx(meta["fit_mean_edges"]["4"], abs=1e-3)]


def test_build_fits_censored_formulas_on_request(tmp_path, capsys):
    argv = [
        "build", "--model", "organism", "--transcoders", "organism", "--corpus",
        "organism:poisoned", "--contexts", "4", "--max-k", "8", "--no-qk", "--batch-size", "4",
        "--fit-k", "4", "--fit-loss", "censored", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "fitted formulas for k in [4] (censored)" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["fit_loss"] == "censored"
    argv = ["faithfulness", str(tmp_path), "--contexts", "2", "--k", "4", "--per-domain", "2"]
    assert main(argv) == 0
    assert "censored least-squares weights" in capsys.readouterr().out
    report = json.loads((tmp_path / "reports" / "faithfulness.json").read_text())
    assert report["fit_loss"] == "censored"


@pytest.mark.parametrize("how", ["abs", "fisher"])
def test_build_ranks_pairs_another_way_on_request(tmp_path, capsys, how):
    argv = [
        "build", "--model", "organism", "--transcoders", "organism", "--corpus",
        "organism:poisoned", "--contexts", "4", "--max-k", "4", "--max-pairs", "64",
        "--batch-size", "4", "--fit-k", "", "--pair-importance", how, "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    assert f"64 QK pairs per head ({how}-ranked)" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["pair_importance"] == how


def test_explain_feature_cli(built, capsys):
    assert main(["explain-feature", str(built), "L1/3", "--k", "4", "--contexts", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("L1/3 = (") and "R² of the top-k formula" in out
    assert main(["explain-feature", str(built), "L0/7", "--json", "--contexts", "0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["feature"] == "L0/7" and len(info["terms"]) == 8


#: `acg build` on the organism up to --transcoders (the value follows)
_BUILD = ["build", "--model", "organism", "--corpus", "organism", "--out", "{tmp}/x"]
_BUILD += ["--transcoders"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain-feature", "{acg}", "L7/1"], "not in the graph"),
        (["explain-feature", "{acg}", "seven"], "LAYER/ID".lower()),
        (["faithfulness", "{tmp}/missing"], "no ACG"),
        (["faithfulness", "{acg}", "--k", "a,b"], "comma-separated"),
        (["tune", "{acg}", "--k", "4"], "no fitted formulas"),
        (["tune", "{acg}", "--k", "8", "--pairs", "999"], "--pairs must be"),
        (["tune", "{acg}", "--k", "8", "--lr-decay", "1.5"], "--lr-decay must be in 0..1"),
        ([*_BUILD, "organism", "--max-fanin", "8"], "--max-fanin needs --fit-fanin adaptive"),
        (
            [*_BUILD, "organism", "--fit-importance", "decoder"],
            "--fit-importance needs --fit-fanin adaptive",
        ),
        (
            [*_BUILD, "organism", "--fit-fanin", "adaptive", "--fit-k", "8", "--max-fanin", "4"],
            "must be at least every fitted k",
        ),
        ([*_BUILD, "{tmp}/none"], "no transcoder folder"),
        (
            ["build", "--model", "organism", "--transcoders", "organism", "--out", "{tmp}/x"],
            "no corpus",
        ),  # fmt: skip
    ],
)
def test_bad_input_is_one_line_and_exit_2(built, tmp_path, capsys, argv, message):
    argv = [a.format(acg=built, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("acg: error:")
    assert message in err[-1].lower() or message in err[-1]
