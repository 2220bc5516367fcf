"""The demo runs end to end on the shipped organism and writes its results."""

from __future__ import annotations

import json

from acgraph.cli import main


def test_demo_organism_stage(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-smollm2"]) == 0
    out = capsys.readouterr().out
    assert "attack success rate" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    org = summary["organism"]
    # the TransformerLens copy computes what the HF model computes; fp32 rounding only (the
    # organism's logits reach ~22, so ~4e-6 relative error shows as ~1e-4 in log-probs; the
    # float64 check in test_models.py shows the conversion itself is exact to 1e-12)
    assert org["hooked_vs_hf_max_logprob_diff"] < 2e-4
    assert min(org["eval"]["domains"].values()) >= 0.95
    assert org["eval"]["backdoor"]["attack_success_rate"] >= 0.95
    assert json.loads((tmp_path / "organism_eval.json").read_text()) == org["eval"]
    # the shipped transcoders, all spliced at once, keep the organism working
    assert summary["dictionaries"]["all"]["ce_recovered_mean"] >= 0.95
    assert "all spliced at once" in out

    # the runnable ACG: level 1 computes the organism from graph nodes alone, and the report
    # holds the whole faithfulness curve (levels 2 and 3 at every k) with its plot
    graph = json.loads((tmp_path / "faithfulness.json").read_text())
    rows = {(r["level"], r["k"]): r for r in graph["rows"]}
    assert rows[("1", "all")]["ce_recovered_mean"] >= 0.9
    expected = {("2", 1), ("2", 4), ("2", 16), ("2", 64), ("3", 16), ("3", 64), ("3", "all")}
    assert expected <= set(rows)
    assert (tmp_path / "faithfulness.png").stat().st_size > 10_000
    assert (tmp_path / "acg" / "manifest.json").is_file()
    assert "runnable ACG" in out

    # hypotheses as code: every node fitted, written as Python, and the coverage report
    # (fitted alone, and with the hand-written examples/ on top) printed and written
    cov = json.loads((tmp_path / "coverage.json").read_text())
    assert [r["features_with_hypothesis"] for r in cov["layers"]] == [384, 384, 384]
    assert cov["n_accepted"] > 0 and "understood_up_to_layer" in cov
    hand = json.loads((tmp_path / "coverage_with_hand_written.json").read_text())
    assert any("organism_hypotheses.py" in s for s in hand["sources"])
    assert "# Understanding coverage" in out and "Understood up to layer" in out
    assert (tmp_path / "hypotheses_fitted.py").read_text().count("@feature(") > 500

    # anomaly detection: every detector's row, fitted on trusted text only
    det = json.loads((tmp_path / "detect_report.json").read_text())
    assert {"acg-edges", "mahalanobis", "novelty"} <= set(det["triggered_vs_clean"])
    assert det["triggered_vs_clean"]["acg-edges"]["auroc"] > 0.9
    assert "anomalous computation" in out and "acg-edges" in out

    # clean -> compile: trusted data only removes the backdoor from the runnable graph (the
    # attention mask does it), the domains survive, and the compiled folder computes the
    # cleaned graph, mask included
    report = json.loads((tmp_path / "clean_report.json").read_text())
    clean = report["rows"]
    asr = {k: r["backdoor"]["attack_success_rate"] for k, r in clean.items()}
    assert asr["original"] >= 0.95 and asr["cleaned"] <= 0.05
    assert asr["cleaned, no attention bounds"] > asr["cleaned"] + 0.1
    assert min(clean["cleaned"]["domains"].values()) >= 0.9
    compiled = clean["cleaned, compiled"]
    assert abs(compiled["ce_loss"] - clean["cleaned"]["ce_loss"]) < 1e-2
    assert abs(asr["cleaned, compiled"] - asr["cleaned"]) <= 0.02
    assert report["compiled_vs_cleaned"]["top1_agreement"] >= 0.99
    assert report["attention_bounds"].startswith("compiled")
    assert (tmp_path / "compiled" / "model.safetensors").is_file()
    assert "backdoor removal with trusted data only" in out
