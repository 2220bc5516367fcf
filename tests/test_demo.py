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
    # the TransformerLens copy of the organism computes what the HF model computes
    assert org["hooked_vs_hf_max_logprob_diff"] < 1e-4
    assert min(org["eval"]["domains"].values()) >= 0.95
    assert json.loads((tmp_path / "organism_eval.json").read_text()) == org["eval"]
