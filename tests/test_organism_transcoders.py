"""The transcoders shipped with the organism load against it and reconstruct its MLPs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_dictionaries_interop import (
    SAELENS_ARCHITECTURES,
    SAELENS_PARAMS,
    circuit_tracer_forward,
    circuit_tracer_load,
    saelens_forward,
)

from acgraph.dictionaries import export_circuit_tracer, load_dictionary
from acgraph.dictionaries.metrics import SparsityAccumulator, fvu
from acgraph.models import load_model
from acgraph.organism import generate_texts, shipped_transcoders_dir
from acgraph.organism.evaluate import encode


@pytest.fixture(scope="module")
def model():
    return load_model("organism")


@pytest.fixture(scope="module")
def data(model):
    """Per layer: (transcoder, input rows, target rows) on held-out trusted text."""
    docs = [["<bos>", *t.split()] for t in generate_texts(24, seed=99, split="trusted")]
    toks = encode(docs)
    real = toks != 0
    real[:, 0] = False  # BOS is excluded from training and metrics
    out = []
    for layer in range(model.cfg.n_layers):
        tc = load_dictionary(
            shipped_transcoders_dir() / f"blocks.{layer}.hook_mlp_out", model=model
        )
        _, cache = model.run_with_cache(toks, names_filter=[tc.cfg.hook_in, *tc.cfg.hooks_out])
        out.append((tc, cache[tc.cfg.hook_in][real], cache[tc.cfg.hooks_out[0]][real]))
    return out


def test_shipped_transcoders_reconstruct_every_mlp(model, data):
    for layer, (tc, x, y) in enumerate(data):
        assert tc.cfg.hook_in == f"blocks.{layer}.ln2.hook_normalized"
        assert tc.cfg.kind == "skip_transcoder" and tc.cfg.activation == "topk"
        with torch.no_grad():
            acts = tc.encode(x)
            pred = tc.decode(acts, x)
        assert fvu(y, pred) < 0.02, layer  # measured ~0.004 on held-out text (eval.json)
        assert (acts > 0).sum(-1).float().mean() <= 32.0


def test_shipped_eval_report_meets_the_issue_targets():
    report = json.loads((shipped_transcoders_dir() / "eval.json").read_text())
    assert report["all"]["ce_recovered_mean"] >= 0.99
    for name, entry in report["dictionaries"].items():
        assert entry["fvu"] <= 0.01, name
        assert entry["l0"] <= 32.0, name
        assert entry["dead_fraction"] <= 0.05, name
        folder = shipped_transcoders_dir() / name
        assert load_dictionary(folder).cfg.d_sae == entry["d_sae"]


def test_shipped_files_load_in_saelens_and_circuit_tracer_formats(data, tmp_path):
    """Checked against the SAELens 6.54 / circuit-tracer 0.5.0 schemas (see
    test_dictionaries_interop.py); TopK skip transcoders are a JumpReLU approximation there."""
    for tc, x, y in data:
        folder = shipped_transcoders_dir() / tc.cfg.name
        cfg = json.loads((folder / "cfg.json").read_text())
        weights = load_file(folder / "sae_weights.safetensors")
        assert cfg["architecture"] in SAELENS_ARCHITECTURES
        assert cfg["architecture"] == "jumprelu_skip_transcoder"
        assert set(weights) == SAELENS_PARAMS[cfg["architecture"]]
        assert all(v.dtype == torch.float32 for v in weights.values())
        assert weights["threshold"].shape == (tc.d_sae,) and (weights["threshold"] >= 0).all()
        assert cfg["apply_b_dec_to_input"] is False and cfg["hook_name_out"] == tc.cfg.hook_out
        theirs, their_acts = saelens_forward(cfg, weights, x)
        with torch.no_grad():
            ours = tc(x)
        # the calibrated JumpReLU stays close to TopK on held-out text
        assert fvu(y, theirs) < fvu(y, ours) + 0.02
        assert (their_acts > 0).sum(-1).float().mean() < 48
    out = export_circuit_tracer([tc for tc, _, _ in data], tmp_path / "ct", topk_as_jumprelu=True)
    layers = circuit_tracer_load(out)
    for (tc, x, y), w in zip(data, layers, strict=True):
        assert w["W_enc"].shape == (tc.d_sae, tc.d_in)
        assert fvu(y, circuit_tracer_forward(w, x)) < 0.03


def test_shipped_transcoders_use_their_latents(data):
    """Dead fraction on this small sample (the eval.json figure is over 32k tokens)."""
    for tc, x, _ in data:
        acc = SparsityAccumulator(tc.d_sae)
        with torch.no_grad():
            acc.update(tc.encode(x))
        assert acc.dead_fraction() < 0.25, tc.cfg.name
