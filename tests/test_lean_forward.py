"""The lean forward computes TransformerLens's hook values, and the activation stream uses it
(or falls back) without changing what it hands out. SmolLM2's case is in test_models.py."""

from __future__ import annotations

import pytest
import torch
from test_models import _lean_gap

from acgraph.dictionaries import ActivationStream
from acgraph.dictionaries.activation_stream import capture_hooks
from acgraph.errors import ConfigError
from acgraph.models import load_model
from acgraph.models.lean import LeanForward, supports

BOS, PAD = 1, 0


@pytest.fixture(scope="module")
def organism():
    return load_model("organism")


def _tokens(n: int, ctx: int = 24, seed: int = 0) -> torch.Tensor:
    toks = torch.randint(3, 60, (n, ctx), generator=torch.Generator().manual_seed(seed))
    toks[:, 0] = BOS
    toks[: n // 3, -5:] = PAD  # right padding, as organism batches have
    return toks


def test_lean_forward_matches_transformer_lens_on_every_organism_layer(organism):
    assert _lean_gap(organism, _tokens(6), list(range(organism.cfg.n_layers))) < 1e-5


def test_lean_forward_refuses_what_it_does_not_compute(organism):
    assert not supports(organism, ["blocks.0.attn.hook_pattern"])
    assert not supports(organism, ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"])
    with pytest.raises(ValueError, match="hook_pattern"):
        LeanForward(organism).run(_tokens(2), ["blocks.0.attn.hook_pattern"])


def _stream(model, hooks, forward, n=40):
    return ActivationStream(model, _tokens(n), hooks, batch_size=64, buffer_tokens=512,
                            model_batch_size=8, exclude_token_ids=[BOS, PAD], seed=5,
                            forward=forward)  # fmt: skip


@pytest.mark.parametrize("forward", ["lean", "compiled"])
def test_stream_rows_agree_across_forwards(organism, forward):
    """Same rows, same order as TransformerLens; 512 tokens = 21.3 contexts, so each block's
    last model batch is short (the compiled forward pads it to keep one shape)."""
    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    ref = _stream(organism, hooks, "transformer_lens").raw_block(0)
    got = _stream(organism, hooks, forward).raw_block(0)
    for h in hooks:
        assert got[h].shape == ref[h].shape
        assert float((got[h] - ref[h]).norm() / ref[h].norm()) < 1e-5


def test_stream_falls_back_for_hooks_the_lean_forward_lacks(organism):
    hooks = ["blocks.0.mlp.hook_post"]
    got = _stream(organism, hooks, "lean").raw_block(0)[hooks[0]]
    ref = _stream(organism, hooks, "transformer_lens").raw_block(0)[hooks[0]]
    assert torch.equal(got, ref)
    with pytest.raises(ConfigError, match="forward must be one of"):
        _stream(organism, hooks, "fast")


def test_bf16_weights_keep_an_fp32_residual(organism):
    """bf16 weights: bf16 matmuls, fp32 residual; close to the fp32 model, closer than
    TransformerLens's all-bf16 forward."""
    half = load_model("organism", dtype=torch.bfloat16)
    hooks = ["blocks.2.hook_resid_post"]
    toks = _tokens(8)
    ref = capture_hooks(organism, toks, hooks)[hooks[0]]
    lean = LeanForward(half).run(toks, hooks)[hooks[0]]
    tl = capture_hooks(half, toks, hooks)[hooks[0]].float()
    lean_err = float((lean - ref).norm() / ref.norm())
    assert lean.dtype == torch.float32 and 0 < lean_err < 2e-2
    assert lean_err < float((tl - ref).norm() / ref.norm())


def test_autocast_and_the_compiled_forward_are_refused_together():
    from acgraph.dictionaries import TrainConfig

    with pytest.raises(ConfigError, match="--model-dtype"):
        TrainConfig(total_tokens=4096, model_autocast="bfloat16", model_forward="compiled")
    assert TrainConfig(total_tokens=4096, model_autocast="bfloat16").model_forward == "lean"
