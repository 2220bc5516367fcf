"""Tests for acgraph.dictionaries: activations, the module, metrics, file formats, splicing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_dictionaries_training import tiny_model  # noqa: E402  (one tiny model for both)
from transformer_lens import HookedTransformer

from acgraph.dictionaries import (
    BatchTopK,
    DictionaryConfig,
    FVUAccumulator,
    JumpReLU,
    ReLU,
    SparseDictionary,
    SparsityAccumulator,
    TopK,
    check_compatible,
    evaluate_dictionaries,
    export_circuit_tracer,
    fvu,
    load_circuit_tracer,
    load_dictionary,
    save_dictionary,
)
from acgraph.errors import ArtifactError, ConfigError

torch.set_num_threads(1)

BOS = 1
D = 32


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return tiny_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(2, 50, (24, 16), generator=gen)
    t[:, 0] = BOS
    t[3, 7] = BOS  # a separator inside a context
    return t


def tc_cfg(layer: int = 0, **kw) -> DictionaryConfig:
    base = dict(
        kind="transcoder",
        d_in=D,
        d_sae=64,
        hook_in=f"blocks.{layer}.ln2.hook_normalized",
        hooks_out=[f"blocks.{layer}.hook_mlp_out"],
        activation="topk",
        k=4,
        model_name="tiny",
        context_size=16,
    )
    base.update(kw)
    return DictionaryConfig(**base)


def randomized(d: SparseDictionary, seed: int = 0) -> SparseDictionary:
    """Give every parameter non-trivial values (biases and W_skip are zero after init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        if hasattr(d.activation, "running_threshold"):
            d.activation.running_threshold.fill_(0.3125)
    return d


# ---------------------------------------------------------------- activations


def test_topk_keeps_exactly_k():
    pre = torch.randn(50, 200, generator=torch.Generator().manual_seed(0)) + 10
    acts = TopK(7)(pre)
    assert ((acts > 0).sum(-1) == 7).all()
    top = pre.topk(7, dim=-1).values.sort(-1).values
    kept = acts.sort(-1).values[:, -7:]
    assert torch.equal(kept, top)


def test_topk_applies_relu_to_kept_values():
    acts = TopK(3)(torch.full((2, 5), -1.0))
    assert (acts == 0).all()


def test_batchtopk_keeps_k_per_token_on_average_and_exports_as_jumprelu():
    gen = torch.Generator().manual_seed(0)
    act = BatchTopK(8)
    act.train()
    for _ in range(300):
        acts = act(torch.randn(256, 512, generator=gen))
        assert int((acts > 0).sum()) == 8 * 256  # exactly k per token, over the batch
    act.eval()
    fresh = torch.randn(4096, 512, generator=gen)
    eval_l0 = float((act(fresh) > 0).sum(-1).float().mean())
    assert abs(eval_l0 - 8) / 8 < 0.1  # the threshold reproduces training-time sparsity
    theta = act.jumprelu_threshold()
    assert torch.equal(act(fresh), fresh * (fresh > theta))


def test_jumprelu_forward_and_threshold_gradient():
    act = JumpReLU(3, init_threshold=0.5, bandwidth=0.2)
    pre = torch.tensor([[0.45, 0.7, 0.1], [0.55, 0.2, 0.58]], requires_grad=True)
    out = act(pre)
    expected = torch.tensor([[0.0, 0.7, 0.0], [0.55, 0.0, 0.58]])
    assert torch.allclose(out, expected)
    out.sum().backward()
    # d out / d theta = -(theta/eps) * #{|pre - theta| < eps/2}; chain rule through log-theta
    counts = torch.tensor([2.0, 0.0, 1.0])
    expected_grad = -(0.5 / 0.2) * counts * 0.5
    assert torch.allclose(act.log_threshold.grad, expected_grad, atol=1e-5)
    assert torch.equal(pre.grad, (pre > 0.5).float())
    # the L0 penalty pushes thresholds up (negative gradient) where pre is near theta
    act.zero_grad()
    pre2 = pre.detach().requires_grad_(True)
    penalty = act.penalty(pre2, act(pre2), torch.ones(3))
    assert float(penalty.detach()) == pytest.approx(3 / 2)
    penalty.backward()
    assert act.log_threshold.grad[0] < 0 and act.log_threshold.grad[2] < 0
    assert act.log_threshold.grad[1] == 0
    assert (pre2.grad == 0).all()


def test_relu_l1_penalty_weights_by_decoder_norms():
    acts = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    penalty = ReLU().penalty(acts, acts, torch.tensor([2.0, 0.5]))
    assert float(penalty) == pytest.approx(((2 + 1) + 1.5) / 2)


# ---------------------------------------------------------------- the module


def test_dictionary_shapes_and_skip():
    d = SparseDictionary(tc_cfg(kind="skip_transcoder", d_out=D))
    assert d.W_enc.shape == (D, 64) and d.W_dec.shape == (64, D)
    assert d.W_skip is not None and d.W_skip.shape == (D, D) and (d.W_skip == 0).all()
    x = torch.randn(5, D)
    randomized(d)
    manual = d.encode(x) @ d.W_dec + d.b_dec + x @ d.W_skip.T
    assert torch.allclose(d(x), manual, atol=1e-6)
    with pytest.raises(ConfigError):
        d.decode(d.encode(x))
    assert SparseDictionary(tc_cfg()).W_skip is None


def test_config_validation():
    with pytest.raises(ConfigError):
        tc_cfg(activation="gelu")
    with pytest.raises(ConfigError):
        tc_cfg(k=100)  # wider than d_sae
    with pytest.raises(ConfigError):
        DictionaryConfig(kind="sae", d_in=4, d_sae=8, hook_in="a", hooks_out=["b"], k=2)
    sae = DictionaryConfig(kind="sae", d_in=4, d_sae=8, hook_in="blocks.0.hook_resid_post", k=2)
    assert sae.hooks_out == ["blocks.0.hook_resid_post"] and sae.name == sae.hook_in
    assert tc_cfg().name == "blocks.0.hook_mlp_out"
    assert tc_cfg().aux_k and tc_cfg().k_aux == D // 2 and tc_cfg().normalize_decoder
    assert not tc_cfg(activation="relu").aux_k
    assert DictionaryConfig.from_dict(tc_cfg().to_dict()) == tc_cfg()


def test_decoder_normalization_helpers():
    d = SparseDictionary(tc_cfg())
    randomized(d)
    d.W_dec.grad = torch.randn_like(d.W_dec)
    d.normalize_decoder_()
    d.remove_parallel_decoder_grad_()
    assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6)
    assert torch.allclose((d.W_dec.grad * d.W_dec).sum(-1), torch.zeros(64), atol=1e-5)


# ---------------------------------------------------------------- metrics


def test_fvu_mean_predictor_is_one_and_perfect_is_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=gen) * 3 + 7  # large mean: variance != E||x||^2
    mean = x.double().mean(0).float()
    acc = FVUAccumulator()
    for chunk in x.split(333):  # streamed over uneven chunks
        acc.update(chunk, mean.expand_as(chunk))
    assert acc.fvu() == pytest.approx(1.0, abs=1e-6)
    assert fvu(x, x) == 0.0
    # variance is measured around the mean, not from zero
    assert fvu(x, torch.zeros_like(x)) > 5
    noisy = x + 0.1 * torch.randn(x.shape, generator=gen)
    streamed = FVUAccumulator()
    for a, b in zip(x.split(100), noisy.split(100), strict=True):
        streamed.update(a, b)
    assert streamed.fvu() == pytest.approx(fvu(x, noisy), rel=1e-9)


def test_geometric_median_resists_outliers():
    from acgraph.dictionaries.training import geometric_median

    points = torch.randn(400, 3, generator=torch.Generator().manual_seed(0))
    points[:8] = torch.tensor([1000.0, 0.0, 0.0])
    median = geometric_median(points)
    assert median.abs().max() < 0.3
    assert points.mean(0).abs().max() > 15


def test_sparsity_accumulator_dead_and_dense():
    acts = torch.zeros(100, 4)
    acts[:, 0] = 1.0  # always on: dense
    acts[:5, 1] = 2.0  # 5%: neither
    acts[:20, 2] = 1.0  # 20%: dense
    acc = SparsityAccumulator(4)
    acc.update(acts[:50])
    acc.update(acts[50:])
    assert acc.l0() == pytest.approx(1.25)
    assert acc.dead_fraction() == 0.25
    assert acc.dense_fraction() == 0.5


# ---------------------------------------------------------------- splicing


def identity_sae(hook: str, name: str | None = None) -> SparseDictionary:
    """An exact identity: relu(x) - relu(-x) with 2*D ReLU latents."""
    cfg = DictionaryConfig(
        kind="sae", d_in=D, d_sae=2 * D, hook_in=hook, activation="relu", name=name
    )
    d = SparseDictionary(cfg)
    eye = torch.eye(D)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        d.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return d.eval()


def test_splicing_a_perfect_dictionary_changes_nothing(model, tokens):
    dicts = [identity_sae("blocks.0.hook_mlp_out"), identity_sae("blocks.1.hook_resid_post")]
    rep = evaluate_dictionaries(model, dicts, tokens, batch_size=8, exclude_token_ids=[BOS])
    assert rep["n_tokens"] == int((tokens != BOS).sum())
    for entry in [*rep["dictionaries"].values(), rep["all"]]:
        assert entry["delta_ce"] == pytest.approx(0.0, abs=1e-9)
        assert entry["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-6)
        assert entry["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-6)
        assert entry["kl"] == pytest.approx(0.0, abs=1e-9)
        assert entry["top1_agreement"] == 1.0
    per = rep["dictionaries"]["blocks.0.hook_mlp_out"]
    assert per["fvu"] == 0.0 and per["ce_zero_ablation"] != per["ce_clean"]


def test_agreement_counts_confident_positions_apart_from_near_ties():
    from acgraph.dictionaries.metrics import AgreementSums

    # reference: position 0 confident (p ≈ 0.98 on token 0), position 1 a near-tie (0 vs 1)
    ref = torch.tensor([[[4.0, 0.0, 0.0], [1.0, 0.99, -3.0], [0.0, 0.0, 0.0]]])
    other = torch.tensor([[[3.0, 0.0, 0.0], [0.99, 1.0, -3.0], [0.0, 0.0, 0.0]]])
    ref_logp = torch.log_softmax(ref[:, :-1].double(), -1)
    sums = AgreementSums()
    sums.update(other, ref_logp, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool))
    r = sums.result()
    assert r["top1_agreement"] == 0.5  # the near-tie flipped
    assert r["top1_agreement_confident"] == 1.0 and r["confident_fraction"] == 0.5


def test_splicing_zero_and_mean_dictionaries_match_the_ablations(model, tokens):
    zero = SparseDictionary(tc_cfg(activation="relu", name="zero"))
    with torch.no_grad():
        zero.W_dec.zero_()
    mean = SparseDictionary(tc_cfg(activation="relu", name="mean"))
    hook = "blocks.0.hook_mlp_out"
    rows = []
    model.run_with_hooks(
        tokens, return_type=None, fwd_hooks=[(hook, lambda v, hook: rows.append(v))]
    )
    with torch.no_grad():
        mean.W_dec.zero_()
        mean.b_dec.copy_(rows[0][tokens != BOS].double().mean(0).float())
    rep = evaluate_dictionaries(model, [zero, mean], tokens, batch_size=24, exclude_token_ids=[BOS])
    z, m = rep["dictionaries"]["zero"], rep["dictionaries"]["mean"]
    assert z["ce_spliced"] == pytest.approx(z["ce_zero_ablation"], abs=1e-9)
    assert z["ce_recovered_zero"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_spliced"] == pytest.approx(m["ce_mean_ablation"], abs=1e-5)
    assert m["fvu"] == pytest.approx(1.0, abs=1e-5)  # the mean predictor
    assert z["dead_fraction"] == 0.0 or z["l0"] >= 0  # sparsity stats are present


# ---------------------------------------------------------------- SAELens format


ALL_VARIANTS = [
    (kind, act)
    for kind in ("sae", "transcoder", "skip_transcoder")
    for act in ("topk", "batchtopk", "jumprelu", "relu")
]


def make_variant(kind: str, act: str) -> SparseDictionary:
    if kind == "sae":
        cfg = DictionaryConfig(
            kind="sae",
            d_in=D,
            d_sae=64,
            hook_in="blocks.1.hook_resid_post",
            activation=act,
            k=4,
            apply_b_dec_to_input=(act == "relu"),
            model_name="tiny",
        )
    else:
        cfg = tc_cfg(kind=kind, activation=act)
    d = randomized(SparseDictionary(cfg))
    if act == "jumprelu":
        d.activation.set_threshold(torch.rand(64, generator=torch.Generator().manual_seed(3)))
    return d.eval()


@pytest.mark.parametrize(("kind", "act"), ALL_VARIANTS)
def test_saelens_round_trip_is_exact(tmp_path, kind, act):
    d = make_variant(kind, act)
    save_dictionary(d, tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.cfg == d.cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(d, name))
    if d.W_skip is not None:
        assert torch.equal(loaded.W_skip, d.W_skip)
    if d.threshold is not None:
        assert torch.equal(loaded.threshold, d.threshold)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(5)) * 2
    assert torch.equal(loaded(x), d(x))
    # saving the loaded one again gives identical files
    save_dictionary(loaded, tmp_path / "again")
    first, second = (
        load_file(tmp_path / "d/sae_weights.safetensors"),
        load_file(tmp_path / "again/sae_weights.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_saelens_cfg_json_fields(tmp_path):
    d = make_variant("skip_transcoder", "batchtopk")
    save_dictionary(d, tmp_path / "d")
    cfg = json.loads((tmp_path / "d/cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (D, 64, D)
    assert cfg["dtype"] == "float32" and cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is False
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.0.ln2.hook_normalized"
    assert meta["hook_name_out"] == "blocks.0.hook_mlp_out"
    assert meta["model_name"] == "tiny" and meta["context_size"] == 16
    assert cfg["context_size"] == 16 and cfg["prepend_bos"] is True
    assert cfg["acgraph"]["format_version"] == 1
    weights = load_file(tmp_path / "d/sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"}
    assert weights["W_enc"].shape == (D, 64) and weights["W_skip"].shape == (D, D)
    assert (weights["threshold"] == 0.3125).all()  # BatchTopK exported as a JumpReLU
    topk = json.loads(
        (save_dictionary(make_variant("sae", "topk"), tmp_path / "t") / "cfg.json").read_text()
    )
    assert topk["architecture"] == "topk" and topk["k"] == 4 and "d_out" not in topk


def write_saelens_folder(path, cfg: dict, tensors: dict) -> None:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))


def test_loads_a_saelens_topk_sae_folder(tmp_path):
    gen = torch.Generator().manual_seed(0)
    t = {
        "W_enc": torch.randn(D, 48, generator=gen),
        "b_enc": torch.randn(48, generator=gen),
        "W_dec": torch.randn(48, D, generator=gen),
        "b_dec": torch.randn(D, generator=gen),
    }
    cfg = {  # as SAELens 6 TopKSAEConfig.to_dict() writes it
        "d_in": D,
        "d_sae": 48,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "model_name": "tiny",
            "hook_name": "blocks.1.hook_resid_post",
            "hook_head_index": None,
            "context_size": 16,
            "prepend_bos": True,
        },
        "architecture": "topk",
        "k": 5,
        "rescale_acts_by_decoder_norm": False,
    }
    write_saelens_folder(tmp_path / "s", cfg, t)
    d = load_dictionary(tmp_path / "s")
    assert d.cfg.kind == "sae" and d.cfg.activation == "topk" and d.cfg.k == 5
    assert d.cfg.apply_b_dec_to_input
    x = torch.randn(10, D, generator=gen)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    vals, idx = pre.topk(5, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    assert torch.allclose(d.encode(x), acts, atol=1e-5)
    assert torch.allclose(d(x), acts @ t["W_dec"] + t["b_dec"], atol=1e-4)


def test_loads_a_saelens_jumprelu_transcoder_and_a_pre_6_standard_sae(tmp_path):
    gen = torch.Generator().manual_seed(1)
    t = {
        "W_enc": torch.randn(D, 40, generator=gen),
        "b_enc": torch.randn(40, generator=gen),
        "W_dec": torch.randn(40, D, generator=gen),
        "b_dec": torch.randn(D, generator=gen),
        "threshold": torch.rand(40, generator=gen),
    }
    cfg = {
        "architecture": "jumprelu_transcoder",
        "d_in": D,
        "d_sae": 40,
        "d_out": D,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {
            "hook_name": "blocks.0.ln2.hook_normalized",
            "hook_name_out": "blocks.0.hook_mlp_out",
            "model_name": "tiny",
        },
    }
    write_saelens_folder(tmp_path / "tc", cfg, t)
    d = load_dictionary(tmp_path / "tc")
    assert (d.cfg.kind, d.cfg.activation, d.cfg.hook_out) == (
        "transcoder",
        "jumprelu",
        "blocks.0.hook_mlp_out",
    )
    x = torch.randn(10, D, generator=gen)
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = pre.relu() * (pre > t["threshold"])
    assert torch.allclose(d(x), acts @ t["W_dec"] + t["b_dec"], atol=1e-4)

    old = {  # SAELens < 6: hook_point, activation_fn_str, no architecture, scaling_factor
        "d_in": D,
        "d_sae": 40,
        "hook_point": "blocks.1.hook_resid_post",
        "model_name": "tiny",
        "activation_fn_str": "relu",
        "dtype": "torch.float32",
    }
    t_old = {k: v for k, v in t.items() if k != "threshold"}
    t_old["scaling_factor"] = torch.ones(40)
    write_saelens_folder(tmp_path / "old", old, t_old)
    d_old = load_dictionary(tmp_path / "old")
    assert d_old.cfg.activation == "relu" and d_old.cfg.apply_b_dec_to_input
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    assert torch.allclose(d_old(x), pre.relu() @ t["W_dec"] + t["b_dec"], atol=1e-4)


def test_loading_refuses_bad_folders(tmp_path, model):
    gen = torch.Generator().manual_seed(2)
    t = {
        "W_enc": torch.randn(D, 8, generator=gen),
        "b_enc": torch.randn(8, generator=gen),
        "W_dec": torch.randn(8, D, generator=gen),
        "b_dec": torch.randn(D, generator=gen),
    }
    meta = {"hook_name": "blocks.0.hook_resid_post"}
    write_saelens_folder(tmp_path / "gated", {"architecture": "gated", "metadata": meta}, t)
    with pytest.raises(ArtifactError, match="gated"):
        load_dictionary(tmp_path / "gated")
    write_saelens_folder(
        tmp_path / "lies", {"architecture": "standard", "d_in": 64, "metadata": meta}, t
    )
    with pytest.raises(ArtifactError, match="d_in=64"):
        load_dictionary(tmp_path / "lies")
    # our own file whose tensor disagrees with its config
    d = make_variant("transcoder", "relu")
    save_dictionary(d, tmp_path / "ours")
    w = load_file(tmp_path / "ours/sae_weights.safetensors")
    w["b_dec"] = torch.zeros(D + 1)
    save_file(w, str(tmp_path / "ours/sae_weights.safetensors"))
    with pytest.raises(ArtifactError, match="b_dec has shape"):
        load_dictionary(tmp_path / "ours")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="missing file"):
        load_dictionary(tmp_path / "empty")


def test_dictionary_model_mismatch_is_refused(model, tmp_path):
    wide = SparseDictionary(tc_cfg(d_in=16))
    with pytest.raises(ArtifactError, match=r"d_in=16.*width 32"):
        check_compatible(wide, model)
    missing = SparseDictionary(tc_cfg(layer=7))
    with pytest.raises(ArtifactError, match=r"blocks\.7\.ln2\.hook_normalized.*'tiny'.*2 layers"):
        check_compatible(missing, model)
    save_dictionary(wide, tmp_path / "wide")
    with pytest.raises(ArtifactError, match="d_in=16"):
        load_dictionary(tmp_path / "wide", model=model)
    check_compatible(SparseDictionary(tc_cfg()), model)  # a matching one passes


# ---------------------------------------------------------------- circuit-tracer export


def test_circuit_tracer_export_layout_and_orientation(tmp_path):
    dicts = [
        randomized(
            SparseDictionary(tc_cfg(layer=i, kind="skip_transcoder", activation="jumprelu")), i
        )
        for i in (1, 0)
    ]
    for d in dicts:
        d.activation.set_threshold(torch.full((64,), 0.05))
        d.eval()
    out = export_circuit_tracer(dicts, tmp_path / "ct")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    assert config["feature_output_hook"] == "hook_mlp_out"
    assert config["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors"]
    assert "activation" not in config  # JumpReLU = no activation key + threshold tensor
    by_layer = {int(d.cfg.hook_in.split(".")[1]): d for d in dicts}
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(9))
    for i in range(2):
        w = load_file(out / f"layer_{i}.safetensors")
        assert set(w) == {
            "W_enc",
            "W_dec",
            "b_enc",
            "b_dec",
            "W_skip",
            "activation_function.threshold",
        }
        d = by_layer[i]
        assert w["W_enc"].shape == (64, D)  # [d_transcoder, d_model]: transposed vs SAELens
        assert torch.equal(w["W_enc"], d.W_enc.T)
        assert w["W_dec"].shape == (64, D) and w["W_skip"].shape == (D, D)
        # circuit-tracer: F.linear(x, W_enc, b_enc); x * (x > thr); acts @ W_dec + b_dec + skip
        pre = torch.nn.functional.linear(x, w["W_enc"], w["b_enc"])
        acts = pre * (pre > w["activation_function.threshold"])
        y = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
        assert torch.allclose(y, d(x), atol=1e-5)
    back = load_circuit_tracer(out)
    assert [b.cfg.hook_in for b in back] == [
        "blocks.0.ln2.hook_normalized",
        "blocks.1.ln2.hook_normalized",
    ]
    assert torch.allclose(back[1](x), by_layer[1](x), atol=1e-6)


def test_circuit_tracer_export_topk_relu_and_errors(tmp_path):
    topk = [SparseDictionary(tc_cfg(layer=i)) for i in range(2)]
    out = export_circuit_tracer(topk, tmp_path / "topk")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["activation"] == "topk" and config["k"] == 4
    assert "activation_function.threshold" not in load_file(out / "layer_0.safetensors")
    for d in topk:
        d.activation.running_threshold.fill_(0.25)
    out = export_circuit_tracer(
        topk, tmp_path / "topk_jr", topk_as_jumprelu=True, path_prefix="hf://me/tc/"
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        "activation" not in config and config["transcoders"][0] == "hf://me/tc/layer_0.safetensors"
    )
    assert (load_file(out / "layer_1.safetensors")["activation_function.threshold"] == 0.25).all()
    relu = [SparseDictionary(tc_cfg(layer=i, activation="relu")) for i in range(2)]
    config = yaml.safe_load(
        (export_circuit_tracer(relu, tmp_path / "relu") / "config.yaml").read_text()
    )
    assert config["activation"] == "relu"
    with pytest.raises(ConfigError, match="layers 0..n-1"):
        export_circuit_tracer([SparseDictionary(tc_cfg(layer=1))], tmp_path / "gap")
    sae = DictionaryConfig(kind="sae", d_in=D, d_sae=8, hook_in="blocks.0.hook_resid_post", k=2)
    with pytest.raises(ConfigError, match="transcoders"):
        export_circuit_tracer([SparseDictionary(sae)], tmp_path / "sae")


@pytest.mark.parametrize(
    ("kind", "act"), [("transcoder", "topk"), ("skip_transcoder", "batchtopk"), ("sae", "topk")]
)
def test_sparse_training_forward_matches_the_dense_one(kind, act):
    cfg = make_variant(kind, act).cfg
    dense, sparse = SparseDictionary(cfg), SparseDictionary(cfg)
    randomized(dense)
    sparse.load_state_dict(dense.state_dict())
    dense.train()
    sparse.train()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, D, generator=gen), torch.randn(40, D, generator=gen)
    out_dense, acts, _ = dense.forward_with_acts(x)
    out_sparse, values, crow, cols, _ = sparse.forward_sparse(x)
    assert torch.allclose(out_dense, out_sparse, atol=1e-5)
    rebuilt = torch.zeros_like(acts)
    rows = torch.repeat_interleave(torch.arange(40), crow.diff())
    rebuilt[rows, cols] = values.detach()
    assert torch.allclose(rebuilt, acts, atol=1e-6)
    (out_dense - y).pow(2).sum().backward()
    (out_sparse - y).pow(2).sum().backward()
    for (name, p_dense), (_, p_sparse) in zip(
        dense.named_parameters(), sparse.named_parameters(), strict=True
    ):
        if p_dense.grad is None:
            assert p_sparse.grad is None or not p_sparse.grad.any(), name
            continue
        scale = float(p_dense.grad.abs().max()) + 1e-6
        assert float((p_dense.grad - p_sparse.grad).abs().max()) / scale < 1e-5, name


def test_topk_transcoder_is_written_as_a_saelens_topk_and_reads_back_without_our_block(tmp_path):
    d = make_variant("transcoder", "topk")
    save_dictionary(d, tmp_path / "d")
    cfg = json.loads((tmp_path / "d/cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["apply_b_dec_to_input"] is False
    del cfg["acgraph"]  # as another tool would see it
    (tmp_path / "d/cfg.json").write_text(json.dumps(cfg))
    foreign = load_dictionary(tmp_path / "d")
    assert foreign.cfg.kind == "transcoder" and foreign.cfg.hook_out == "blocks.0.hook_mlp_out"
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(2))
    assert torch.equal(foreign(x), d(x))
