"""Training sparse dictionaries: quality, BatchTopK export, shards, exact resume after SIGKILL.

Run as a script (``python tests/test_dictionaries_training.py OUT [--resume] [--slow]``) it
trains the run that the SIGKILL test interrupts and resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from acgraph.dictionaries import (
    ActivationStream,
    DictionaryConfig,
    SparseDictionary,
    StreamPosition,
    TrainConfig,
    evaluate_dictionaries,
    latest_checkpoint,
    load_dictionary,
    save_dictionary,
    train_dictionaries,
)
from acgraph.errors import ArtifactError, ConfigError

torch.set_num_threads(1)

BOS, PAD = 1, 0
D = 32


def tiny_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D,
        n_ctx=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=50,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
        model_name="tiny",
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def tiny_tokens(n: int = 256, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(2, 50, (n, 32), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = BOS
    tokens[::7, -3:] = PAD  # some padded contexts
    return tokens


def transcoders(activations=("topk", "batchtopk"), **kw) -> list[DictionaryConfig]:
    return [
        DictionaryConfig(
            kind="transcoder",
            d_in=D,
            d_sae=128,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hooks_out=[f"blocks.{layer}.hook_mlp_out"],
            activation=act,
            k=8,
            dead_tokens=20_000,
            **kw,
        )
        for layer, act in enumerate(activations)
    ]


def resume_run_config() -> TrainConfig:
    return TrainConfig(
        total_tokens=120 * 256,
        batch_size=256,
        buffer_tokens=2048,
        lr=5e-3,
        lr_warmup_steps=10,
        checkpoint_every=20,
        progress=False,
    )


def resume_run(out: Path, resume: bool) -> None:
    configs = transcoders()
    # dead-latent resampling (before and after the kill) must resume exactly too
    configs[0] = configs[0].replace(dead_tokens=1024, resample_every=5)
    configs.append(
        DictionaryConfig(
            kind="sae",
            d_in=D,
            d_sae=64,
            hook_in="blocks.1.hook_resid_post",
            activation="jumprelu",
            l0_coefficient=1e-3,
        )
    )
    train_dictionaries(
        tiny_model(),
        tiny_tokens(),
        configs,
        out,
        resume_run_config(),
        resume=resume,
        exclude_token_ids=[BOS, PAD],
    )


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return tiny_model()


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(
        total_tokens=200 * 256,
        batch_size=256,
        buffer_tokens=4096,
        lr=1e-2,
        checkpoint_every=0,
        progress=False,
    )
    jumprelu = DictionaryConfig(
        kind="transcoder",
        d_in=D,
        d_sae=128,
        hook_in="blocks.0.ln2.hook_normalized",
        hooks_out=["blocks.0.hook_mlp_out"],
        activation="jumprelu",
        l0_coefficient=1e-2,
        name="jumprelu0",
    )
    result = train_dictionaries(
        model, tiny_tokens(), [*transcoders(), jumprelu], out, cfg, exclude_token_ids=[BOS, PAD]
    )
    return result, out


# ---------------------------------------------------------------- quality


def test_training_reduces_fvu_well_below_one(model, trained):
    result, out = trained
    first, last = result.history[0], result.history[-1]
    assert first["step"] == 10 and last["step"] == 200
    held_out = tiny_tokens(48, seed=99)
    report = evaluate_dictionaries(
        model, result.dictionaries, held_out, exclude_token_ids=[BOS, PAD], progress=False
    )
    assert "all" not in report and "all_skipped" in report  # two write blocks.0.hook_mlp_out
    joint = evaluate_dictionaries(
        model, result.dictionaries[:2], held_out, exclude_token_ids=[BOS, PAD], progress=False
    )
    for name, entry in report["dictionaries"].items():
        assert entry["fvu"] < 0.35, (name, entry["fvu"])
        assert entry["delta_ce"] < 0.05
    jumprelu = [h["dictionaries"]["jumprelu0"] for h in result.history]
    assert jumprelu[-1]["l0"] < 0.5 * jumprelu[0]["l0"]  # the L0 penalty moved the thresholds
    assert result.dictionaries[2].cfg.jumprelu_bandwidth > 0  # resolved from the data
    topk = report["dictionaries"]["blocks.0.hook_mlp_out"]
    assert topk["l0"] == pytest.approx(8.0, abs=0.05)  # at most k, ReLU can drop a few
    assert joint["all"]["ce_recovered_zero"] > 0.5
    assert joint["all"]["dictionaries"] == [d.cfg.name for d in result.dictionaries[:2]]
    # TopK/BatchTopK decoders stay unit norm
    for d in result.dictionaries[:2]:
        assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(128), atol=1e-5)
    # the final dictionaries were written in the SAELens layout
    for d in result.dictionaries:
        loaded = load_dictionary(out / d.cfg.name, model=model)
        assert torch.equal(loaded.W_enc, d.W_enc)
    assert (out / "training_log.json").is_file()


def test_trained_topk_transcoder_carries_a_calibrated_jumprelu_threshold(model, trained):
    result, out = trained
    topk = result.dictionaries[0]
    theta = topk.activation.latent_threshold
    assert theta is not None and theta.shape == (128,) and (theta >= 0).all()
    # d_in == d_out and no skip: written as SAELens's (exact) TopKSAE, which has no threshold
    # parameter, so the calibration stays in memory (export_circuit_tracer uses it)
    loaded = load_dictionary(out / topk.cfg.name)
    assert loaded.cfg.activation == "topk" and loaded.activation.latent_threshold is None
    skip = SparseDictionary(topk.cfg.replace(kind="skip_transcoder"))
    skip.load_state_dict(topk.state_dict(), strict=False)
    skip.activation.latent_threshold = theta
    again = load_dictionary(save_dictionary(skip, out / "as_skip"))
    assert torch.equal(again.activation.latent_threshold, theta)


def _dead_start(seed: int = 0) -> SparseDictionary:
    """A TopK transcoder whose latents 0..31 can never fire (huge negative encoder bias)."""
    d = SparseDictionary(transcoders(("topk",))[0].replace(dead_tokens=1024), seed=seed)
    with torch.no_grad():
        d.b_dec.copy_(torch.zeros(D))
        d.b_enc[:32] = -1e4
    return d


def _train_dead_start(model, **changes) -> tuple[SparseDictionary, list]:
    d = _dead_start()
    d.cfg = d.cfg.replace(**changes)
    cfg = TrainConfig(
        total_tokens=60 * 256,
        batch_size=256,
        buffer_tokens=4096,
        lr=5e-3,
        lr_warmup_steps=5,
        checkpoint_every=0,
        progress=False,
        log_every=1,
    )
    result = train_dictionaries(model, tiny_tokens(), [d], None, cfg, exclude_token_ids=[BOS, PAD])
    return result.dictionaries[0], result.history


def test_resampling_revives_dead_latents_deterministically(model):
    plain, _ = _train_dead_start(model)
    revived, history = _train_dead_start(model, resample_every=5)
    again, _ = _train_dead_start(model, resample_every=5)
    assert torch.equal(revived.W_enc, again.W_enc)  # no random numbers involved
    resampled = [h["dictionaries"][revived.cfg.name].get("resampled", 0) for h in history]
    assert sum(resampled) >= 32
    # only in the first half of training (resample_until = 0.5)
    assert not any(r for h, r in zip(history, resampled, strict=True) if h["step"] > 30)
    x = ActivationStream(
        model,
        tiny_tokens(64, seed=5),
        ["blocks.0.ln2.hook_normalized"],
        batch_size=256,
        buffer_tokens=4096,
        exclude_token_ids=[BOS, PAD],
    ).block(0)["blocks.0.ln2.hook_normalized"]
    with torch.no_grad():
        fired_plain = (plain.encode(x)[:, :32] > 0).any(0).sum()
        fired_revived = (revived.encode(x)[:, :32] > 0).any(0).sum()
    assert fired_plain == 0  # AuxK cannot undo a -1e4 bias in 60 steps
    assert fired_revived >= 16


def test_aux_k_normalization_options(model):
    with pytest.raises(ConfigError, match="aux_k_normalization"):
        transcoders(("topk",), aux_k_normalization="bogus")
    with pytest.raises(ConfigError, match="resample"):
        transcoders(("topk",), resample_until=1.5)
    for norm in ("residual", "output"):
        d, history = _train_dead_start(model, aux_k_normalization=norm)
        aux = [h["dictionaries"][d.cfg.name].get("aux") for h in history]
        assert any(a is not None and a > 0 for a in aux), norm


def test_batchtopk_export_reproduces_training_sparsity(model, trained):
    result, out = trained
    batchtopk = load_dictionary(out / "blocks.1.hook_mlp_out")  # saved as jumprelu_transcoder
    assert batchtopk.cfg.activation == "batchtopk"
    assert torch.equal(batchtopk.threshold, result.dictionaries[1].threshold)
    report = evaluate_dictionaries(
        model,
        [batchtopk],
        tiny_tokens(64, seed=7),
        exclude_token_ids=[BOS, PAD],
        splice=False,
        progress=False,
    )
    l0 = report["dictionaries"]["blocks.1.hook_mlp_out"]["l0"]
    assert abs(l0 - 8) / 8 < 0.25, l0


def test_stream_excludes_special_tokens_and_is_deterministic(model):
    tokens = tiny_tokens(16)
    kw = dict(batch_size=64, buffer_tokens=256, exclude_token_ids=[BOS, PAD], seed=3)
    a = ActivationStream(model, tokens, ["blocks.0.hook_resid_pre"], **kw)
    b = ActivationStream(model, tokens, ["blocks.0.hook_resid_pre"], **kw)
    block = a.raw_block(0)["blocks.0.hook_resid_pre"]
    contexts = a.block_contexts(0)
    assert block.shape[0] == int(((contexts != BOS) & (contexts != PAD)).sum())
    # embeddings of kept tokens only: compare with W_E + W_pos directly
    keep = (contexts != BOS) & (contexts != PAD)
    pos = torch.arange(32).expand_as(contexts)
    expected = model.W_E[contexts[keep]] + model.W_pos[pos[keep]]
    assert torch.allclose(block, expected, atol=1e-5)
    batches_a = [batch for _, (_, batch) in zip(range(10), a.batches(), strict=False)]
    later = [
        batch for _, (_, batch) in zip(range(4), b.batches(StreamPosition(1, 1)), strict=False)
    ]
    n0 = a.batches_in_block(0)
    assert torch.equal(
        batches_a[n0 + 1]["blocks.0.hook_resid_pre"], later[0]["blocks.0.hook_resid_pre"]
    )


def test_last_block_is_computed_only_as_far_as_the_run_needs(model):
    kw = dict(batch_size=64, buffer_tokens=1024, exclude_token_ids=[BOS, PAD], seed=3)
    full = ActivationStream(model, tiny_tokens(64), ["blocks.0.hook_resid_pre"], **kw)
    n0 = full.batches_in_block(0)
    total = n0 + 2  # two batches into block 1
    cut = ActivationStream(model, tiny_tokens(64), ["blocks.0.hook_resid_pre"], **kw)
    got = [b for _, (_, b) in zip(range(total), cut.batches(total_batches=total), strict=False)]
    rows_full = full.block(1)["blocks.0.hook_resid_pre"].shape[0]
    rows_cut = cut.cached_block()["blocks.0.hook_resid_pre"].shape[0]
    assert 2 * 64 <= rows_cut < rows_full
    ref = [b for _, (_, b) in zip(range(n0), full.batches(), strict=False)]
    for a, b in zip(ref, got[:n0], strict=True):  # full blocks are unchanged
        assert torch.equal(a["blocks.0.hook_resid_pre"], b["blocks.0.hook_resid_pre"])
    # resuming inside the cut block (1 batch taken of it) gives the same batch
    again = ActivationStream(model, tiny_tokens(64), ["blocks.0.hook_resid_pre"], **kw)
    _, nxt = next(again.batches(StreamPosition(1, 1), total_batches=total, batches_done=n0 + 1))
    assert torch.equal(nxt["blocks.0.hook_resid_pre"], got[n0 + 1]["blocks.0.hook_resid_pre"])


def test_shards_are_reused(model, tmp_path):
    tokens = tiny_tokens(64)
    cfg = TrainConfig(
        total_tokens=20 * 256, batch_size=256, buffer_tokens=2048, lr=5e-3, progress=False
    )
    kw = dict(exclude_token_ids=[BOS, PAD], save_final=False)
    plain = train_dictionaries(model, tokens, transcoders(("topk",)), None, cfg, **kw)
    first = train_dictionaries(
        model, tokens, transcoders(("topk",)), None, cfg, shard_dir=tmp_path, **kw
    )
    shards = sorted(tmp_path.glob("block_*.safetensors"))
    assert shards and (tmp_path / "manifest.json").is_file()
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        second = train_dictionaries(
            model, tokens, transcoders(("topk",)), None, cfg, shard_dir=tmp_path, **kw
        )
    finally:
        handle.remove()
    assert len(calls) <= 1  # only the one-context width probe ran the model
    for run in (first, second):
        assert torch.equal(run.dictionaries[0].W_dec, plain.dictionaries[0].W_dec)
    other = TrainConfig(**{**cfg.to_dict(), "seed": 1})
    with pytest.raises(ArtifactError, match="seed"):
        train_dictionaries(
            model, tokens, transcoders(("topk",)), None, other, shard_dir=tmp_path, **kw
        )


def test_existing_checkpoint_needs_resume_and_same_settings(model, tmp_path):
    cfg = TrainConfig(total_tokens=4 * 256, batch_size=256, buffer_tokens=2048, progress=False)
    train_dictionaries(model, tiny_tokens(32), transcoders(("topk",)), tmp_path, cfg)
    assert latest_checkpoint(tmp_path) is not None
    with pytest.raises(ArtifactError, match="resume"):
        train_dictionaries(model, tiny_tokens(32), transcoders(("topk",)), tmp_path, cfg)
    wider = transcoders(("topk",))[0].replace(d_sae=256)
    with pytest.raises(ConfigError, match="d_sae=256"):
        train_dictionaries(model, tiny_tokens(32), [wider], tmp_path, cfg, resume=True)
    changed = TrainConfig(**{**cfg.to_dict(), "batch_size": 128})
    with pytest.raises(ConfigError, match="batch_size"):
        train_dictionaries(model, tiny_tokens(32), [], tmp_path, changed, resume=True)
    with pytest.raises(ArtifactError, match="width 32"):
        train_dictionaries(model, tiny_tokens(32), transcoders(("topk",), d_out=16), None, cfg)


# ---------------------------------------------------------------- exact resume after SIGKILL


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for folder in sorted(p for p in out.iterdir() if (p / "cfg.json").is_file()):
        for key, value in load_file(folder / "sae_weights.safetensors").items():
            weights[f"{folder.name}/{key}"] = value
    return weights


def test_sigkill_midway_then_resume_matches_an_uninterrupted_run(tmp_path):
    script = Path(__file__).resolve()
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    resume_run(reference, resume=False)  # in-process: the same code, the same single thread

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(interrupted), "--slow"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(interrupted) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(latest_checkpoint(interrupted).name.split("_")[1])
    assert 0 < killed_at < resume_run_config().total_steps

    done = subprocess.run(
        [sys.executable, str(script), str(interrupted), "--resume"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    ref, got = _final_weights(reference), _final_weights(interrupted)
    assert ref.keys() == got.keys() and len(ref) >= 12
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert worst <= 1e-6, worst


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    if "--slow" in sys.argv:  # give the killer time to strike after the first checkpoint
        import acgraph.dictionaries.training as training_module

        real_step = training_module._train_step

        def slow_step(*args, **kwargs):
            time.sleep(0.02)
            return real_step(*args, **kwargs)

        training_module._train_step = slow_step
    resume_run(out_dir, resume="--resume" in sys.argv)


def test_bf16_model_autocast_stream(model, tmp_path):
    """--model-autocast bfloat16: the forward runs in bf16 matmuls (activations close to fp32
    but not equal), rows stay fp32, and shards made one way refuse the other."""
    hooks = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
    kw = dict(batch_size=64, buffer_tokens=256, exclude_token_ids=[BOS, PAD], seed=3)
    fp32 = ActivationStream(model, tiny_tokens(16), hooks, **kw).raw_block(0)
    bf16 = ActivationStream(model, tiny_tokens(16), hooks, autocast=torch.bfloat16, **kw)
    half = bf16.raw_block(0)
    for hook in hooks:
        assert half[hook].dtype == torch.float32
        err = (half[hook] - fp32[hook]).pow(2).sum() / fp32[hook].pow(2).sum()
        assert 0 < float(err) < 1e-3
    ActivationStream(model, tiny_tokens(16), hooks, shard_dir=tmp_path, **kw)
    with pytest.raises(ArtifactError, match="autocast"):
        ActivationStream(
            model, tiny_tokens(16), hooks, shard_dir=tmp_path, autocast=torch.bfloat16, **kw
        )
    with pytest.raises(ConfigError, match="model_autocast"):
        TrainConfig(total_tokens=1024, batch_size=256, model_autocast="float8")
    cfg = TrainConfig(
        total_tokens=8 * 256, batch_size=256, buffer_tokens=2048, lr=5e-3, progress=False,
        model_autocast="bfloat16",
    )  # fmt: skip
    run = train_dictionaries(
        model, tiny_tokens(64), transcoders(("topk",)), None, cfg,
        exclude_token_ids=[BOS, PAD], save_final=False,
    )  # fmt: skip
    assert run.steps == 8 and torch.isfinite(run.dictionaries[0].W_dec).all()


def test_bf16_model_weights_train_in_fp32_and_resume_only_in_bf16(model, tmp_path):
    """--model-dtype bfloat16: the model's own weights are bf16, the stream still hands out
    fp32 rows close to the fp32 model's, and a checkpoint refuses to resume on another dtype."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    hooks = ["blocks.1.hook_resid_post"]
    kw = dict(batch_size=64, buffer_tokens=256, exclude_token_ids=[BOS, PAD], seed=3)
    ref = ActivationStream(model, tiny_tokens(16), hooks, **kw).raw_block(0)[hooks[0]]
    got = ActivationStream(half, tiny_tokens(16), hooks, **kw).raw_block(0)[hooks[0]]
    assert got.dtype == torch.float32
    err = (got - ref).pow(2).sum() / ref.pow(2).sum()
    assert 0 < float(err) < 1e-3
    cfg = TrainConfig(total_tokens=4 * 256, batch_size=256, buffer_tokens=2048, progress=False)
    run = train_dictionaries(half, tiny_tokens(32), transcoders(("topk",)), tmp_path, cfg)
    assert run.dictionaries[0].W_enc.dtype == torch.float32
    with pytest.raises(ConfigError, match="bfloat16, not float32"):
        train_dictionaries(model, tiny_tokens(32), [], tmp_path, cfg, resume=True)
    assert train_dictionaries(half, tiny_tokens(32), [], tmp_path, cfg, resume=True).steps == 4
