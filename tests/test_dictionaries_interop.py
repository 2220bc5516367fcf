"""Our files against the public formats, without the peers installed.

The schemas here are read from the peers' source: SAELens 6.54.12 (``sae_lens/__init__.py``
``register_sae_class``, ``saes/*.py`` config dataclasses and forwards,
``loading/pretrained_sae_loaders.py`` ``handle_pre_6_0_config``) and circuit-tracer 0.5.0
(``utils/hf_utils.py`` ``load_transcoders``, ``transcoder/single_layer_transcoder.py``
``load_relu_transcoder``). The reference forwards below re-implement what those libraries compute
from a file, independently of acgraph's module. The real libraries run in their own venvs in
``bench/dictionaries/interop_*.py`` (``bench/dictionaries/run.py interop``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from acgraph.dictionaries import (
    DictionaryConfig,
    SparseDictionary,
    export_circuit_tracer,
    load_circuit_tracer,
    load_dictionary,
    save_dictionary,
)
from acgraph.dictionaries.formats import saelens_architecture, saelens_is_exact
from acgraph.errors import ConfigError

torch.set_num_threads(1)

D = 16
W = 48

# SAELens 6.54.12: architectures that SAE.load_from_disk can build (register_sae_class)
SAELENS_ARCHITECTURES = {
    "standard",
    "gated",
    "topk",
    "abstopk",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
    "temporal",
    "matching_pursuit",
}
# the parameters (= the safetensors keys load_state_dict(strict=True) accepts) of the ones we write
SAELENS_PARAMS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "transcoder": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"},
    "jumprelu_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "jumprelu_skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"},
}
SAELENS_TRANSCODERS = {a for a in SAELENS_PARAMS if "transcoder" in a}
# config dataclass fields (SAEConfig, + TopKSAEConfig / TranscoderConfig extras)
SAELENS_BASE_FIELDS = {
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
}
SAELENS_NORMALIZE = {
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
}
# handle_pre_6_0_config copies these top-level keys into metadata (our cfg.json carries no
# sae_lens_version, so SAELens takes that path)
SAELENS_LLM_METADATA_KEYS = {
    "model_name",
    "hook_name",
    "hook_head_index",
    "prepend_bos",
    "exclude_special_tokens",
    "context_size",
    "hook_name_out",
}

VARIANTS = [
    ("sae", "relu"),
    ("sae", "jumprelu"),
    ("sae", "topk"),
    ("sae", "batchtopk"),
    ("transcoder", "relu"),
    ("transcoder", "jumprelu"),
    ("transcoder", "topk"),
    ("transcoder", "batchtopk"),
    ("skip_transcoder", "relu"),
    ("skip_transcoder", "jumprelu"),
    ("skip_transcoder", "topk"),
    ("skip_transcoder", "batchtopk"),
]


def make(kind: str, act: str, *, d_out: int = D, layer: int = 0, seed: int = 0):
    if kind == "sae":
        cfg = DictionaryConfig(
            kind="sae",
            d_in=D,
            d_sae=W,
            hook_in=f"blocks.{layer}.hook_resid_post",
            activation=act,
            k=4,
            apply_b_dec_to_input=(act == "relu"),
            model_name="tiny",
            context_size=16,
        )
    else:
        cfg = DictionaryConfig(
            kind=kind,
            d_in=D,
            d_out=d_out,
            d_sae=W,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hooks_out=[f"blocks.{layer}.hook_mlp_out"],
            activation=act,
            k=4,
            model_name="tiny",
            context_size=16,
        )
    d = SparseDictionary(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        if hasattr(d.activation, "running_threshold"):
            d.activation.running_threshold.fill_(0.2)
        if act == "jumprelu":
            d.activation.set_threshold(0.3 * torch.rand(W, generator=gen))
    return d.eval()


def inputs(n: int = 64, seed: int = 7) -> torch.Tensor:
    return 2 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def saelens_forward(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor):
    """What SAELens 6.54 computes for a cfg.json + weights: (output, feature activations)."""
    arch = cfg["architecture"]
    if arch in SAELENS_TRANSCODERS:
        sae_in = x  # Transcoder.process_sae_in never subtracts b_dec
    else:
        sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        assert not cfg.get("rescale_acts_by_decoder_norm", False)
        values, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    elif arch.startswith("jumprelu"):
        acts = pre.relu() * (pre > w["threshold"]).to(pre.dtype)
    else:
        acts = pre.relu()
    out = acts @ w["W_dec"] + w["b_dec"]
    if "skip" in arch:
        out = out + x @ w["W_skip"].T
    return out, acts


def read_saelens(path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    cfg = json.loads((path / "cfg.json").read_text())
    weights = load_file(path / "sae_weights.safetensors")
    with safe_open(str(path / "sae_weights.safetensors"), framework="pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    return cfg, weights, dtypes


# ---------------------------------------------------------------- SAELens


@pytest.mark.parametrize(("kind", "act"), VARIANTS)
def test_saelens_files_match_the_654_schema(tmp_path, kind, act):
    d = make(kind, act)
    cfg, w, dtypes = read_saelens(save_dictionary(d, tmp_path / "d"))
    arch = cfg["architecture"]
    assert arch in SAELENS_ARCHITECTURES, arch
    assert set(w) == SAELENS_PARAMS[arch], (arch, sorted(w))
    assert set(dtypes.values()) == {"F32"} and cfg["dtype"] == "float32"
    d_out = D
    shapes = {
        "W_enc": (D, W),
        "b_enc": (W,),
        "W_dec": (W, d_out),
        "b_dec": (d_out,),
        "threshold": (W,),
        "W_skip": (d_out, D),
    }
    for key, value in w.items():
        assert tuple(value.shape) == shapes[key], key
    # fields the config dataclasses read
    assert SAELENS_BASE_FIELDS - {"metadata"} <= set(cfg)
    assert isinstance(cfg["d_in"], int) and isinstance(cfg["d_sae"], int)
    assert (cfg["d_in"], cfg["d_sae"]) == (D, W)
    assert cfg["normalize_activations"] in SAELENS_NORMALIZE
    assert cfg["reshape_activations"] == "none" and cfg["device"] == "cpu"
    if arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    if arch in SAELENS_TRANSCODERS:
        # TranscoderConfig.__post_init__ raises when apply_b_dec_to_input is true, and the
        # pre-6.0 path defaults a missing one to true: it must be written, and false
        assert cfg["apply_b_dec_to_input"] is False
        assert cfg["d_out"] == d_out
    # SAELens builds metadata from these top-level keys (no sae_lens_version: pre-6.0 path)
    assert "sae_lens_version" not in cfg and "sae_lens_version" not in cfg["metadata"]
    top = {k: cfg[k] for k in SAELENS_LLM_METADATA_KEYS if k in cfg}
    assert top["hook_name"] == d.cfg.hook_in and top["model_name"] == "tiny"
    assert top["context_size"] == 16 and top["prepend_bos"] is True
    if kind != "sae":
        assert top["hook_name_out"] == d.cfg.hook_out
        assert cfg["metadata"]["hook_name_out"] == d.cfg.hook_out
    assert cfg["metadata"]["hook_name"] == d.cfg.hook_in


@pytest.mark.parametrize(("kind", "act"), VARIANTS)
def test_saelens_semantics_reproduce_our_outputs(tmp_path, kind, act):
    d = make(kind, act)
    x = inputs()
    if act == "topk" and kind != "sae":
        d.calibrate_topk_threshold_(x)
    cfg, w, _ = read_saelens(save_dictionary(d, tmp_path / "d"))
    theirs, their_acts = saelens_forward(cfg, w, x)
    with torch.no_grad():
        ours, our_acts, _ = d.forward_with_acts(x)
    if saelens_is_exact(d.cfg):
        assert torch.allclose(theirs, ours, atol=1e-5)
        assert torch.equal(their_acts != 0, our_acts != 0)
    else:
        # TopK (skip) transcoder as a SAELens JumpReLU one: on the calibration rows every latent
        # fires exactly as often as under TopK, and the total L0 is the same
        assert (act, kind) in {("topk", "transcoder"), ("topk", "skip_transcoder")}
        assert torch.equal((their_acts != 0).sum(0), (our_acts != 0).sum(0))
        assert "saelens_approximation" in cfg["acgraph"]
        # acgraph itself still reads the exact TopK back
        assert torch.equal(load_dictionary(tmp_path / "d")(x), d(x))


def test_topk_transcoder_with_d_out_other_than_d_in_is_a_saelens_jumprelu_transcoder(tmp_path):
    d = make("transcoder", "topk", d_out=D + 8)
    assert saelens_architecture(d.cfg) == "jumprelu_transcoder"
    assert saelens_architecture(make("transcoder", "topk").cfg) == "topk"  # exact in SAELens
    assert saelens_architecture(make("skip_transcoder", "topk").cfg) == "jumprelu_skip_transcoder"
    cfg, w, _ = read_saelens(save_dictionary(d, tmp_path / "d"))
    assert cfg["d_out"] == D + 8 and w["W_dec"].shape == (W, D + 8)
    # uncalibrated: the running per-token cut-off, for every latent
    assert torch.equal(w["threshold"], torch.full((W,), 0.2))
    # a foreign reader (no acgraph block) gets the JumpReLU SAELens would run
    del cfg["acgraph"]
    (tmp_path / "d/cfg.json").write_text(json.dumps(cfg))
    foreign = load_dictionary(tmp_path / "d")
    assert foreign.cfg.activation == "jumprelu" and foreign.cfg.d_out == D + 8
    x = inputs()
    assert torch.allclose(foreign(x), saelens_forward(cfg, w, x)[0], atol=1e-5)


def test_calibrated_topk_threshold_reproduces_firing_counts_and_survives_a_round_trip(tmp_path):
    d = make("skip_transcoder", "topk")
    x = inputs(200, seed=3)
    theta = d.calibrate_topk_threshold_(x)
    assert theta.shape == (W,) and (theta >= 0).all()
    with torch.no_grad():
        pre = d.pre_acts(x)
        topk_counts = (d.encode(x) != 0).sum(0)
        jump_counts = (pre > theta).sum(0)
    assert torch.equal(topk_counts, jump_counts)
    assert torch.equal(d.activation.jumprelu_threshold(), theta)
    loaded = load_dictionary(save_dictionary(d, tmp_path / "d"))
    assert torch.equal(loaded.activation.latent_threshold, theta)
    assert loaded.threshold is None  # TopK has no SAELens-style threshold property
    again, _, _ = read_saelens(save_dictionary(loaded, tmp_path / "again"))
    assert torch.equal(load_file(tmp_path / "d/sae_weights.safetensors")["threshold"], theta)
    assert again["architecture"] == "jumprelu_skip_transcoder"
    with pytest.raises(ConfigError, match="TopK"):
        make("skip_transcoder", "relu").calibrate_topk_threshold_(x)


# ---------------------------------------------------------------- circuit-tracer


def circuit_tracer_load(folder) -> list[dict]:
    """What circuit-tracer 0.5.0 reads from a local transcoder set: config keys, then each
    layer file's tensors (load_relu_transcoder: JumpReLU iff activation_function.threshold)."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert isinstance(config["feature_input_hook"], str)
    assert isinstance(config["feature_output_hook"], str)
    paths = config["transcoders"]
    assert isinstance(paths, list) and all(isinstance(p, str) for p in paths)
    layers = []
    for path in paths:
        w = load_file(folder / path)
        assert set(w) <= {
            "W_enc",
            "W_dec",
            "b_enc",
            "b_dec",
            "W_skip",
            "activation_function.threshold",
        }
        assert w.get("log_thresholds") is None
        layers.append(w)
    return layers


def circuit_tracer_forward(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    pre = F.linear(x, w["W_enc"], w["b_enc"])  # W_enc is [d_transcoder, d_model]
    if "activation_function.threshold" in w:
        acts = pre * (pre > w["activation_function.threshold"]).to(pre.dtype)
    else:
        acts = F.relu(pre)
    out = acts @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return out


@pytest.mark.parametrize("act", ["relu", "jumprelu", "batchtopk", "topk"])
def test_circuit_tracer_set_schema_and_semantics(tmp_path, act):
    dicts = [make("skip_transcoder", act, layer=i, seed=i) for i in range(3)]
    x = inputs()
    if act == "topk":
        for d in dicts:
            d.calibrate_topk_threshold_(x)
    out = export_circuit_tracer(dicts, tmp_path / "ct", topk_as_jumprelu=True)
    layers = circuit_tracer_load(out)
    assert len(layers) == 3
    for d, w in zip(dicts, layers, strict=True):
        assert w["W_enc"].shape == (W, D) and w["W_dec"].shape == (W, D)
        assert w["b_enc"].shape == (W,) and w["b_dec"].shape == (D,)
        assert w["W_skip"].shape == (D, D)
        assert all(v.dtype == torch.float32 for v in w.values())
        theirs = circuit_tracer_forward(w, x)
        with torch.no_grad():
            ours, acts, _ = d.forward_with_acts(x)
        if act == "topk":  # approximation: same firing count per latent on the calibration rows
            their_acts = F.linear(x, w["W_enc"], w["b_enc"])
            fired = their_acts > w["activation_function.threshold"]
            assert torch.equal(fired.sum(0), (acts != 0).sum(0))
        else:
            assert torch.allclose(theirs, ours, atol=1e-5)
    # and acgraph reads the set back
    back = load_circuit_tracer(out)
    assert [b.cfg.hook_out for b in back] == [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    if act != "topk":
        assert torch.allclose(back[2](x), dicts[2](x), atol=1e-6)
