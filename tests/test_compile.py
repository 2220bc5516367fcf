"""`acg compile`: a level-1 ACG written back as a plain GPT-2 (or Llama) network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_graph import tiny_llama
from transformer_lens import HookedTransformer, HookedTransformerConfig

from acgraph.dictionaries.config import DictionaryConfig
from acgraph.dictionaries.dictionary import SparseDictionary
from acgraph.errors import ArtifactError, ConfigError
from acgraph.graph import ACGModel, ModelWeights
from acgraph.safety.clean import CappedActivation
from acgraph.safety.compile import (
    agreement,
    calibrate_thresholds,
    compile_acg,
    derive_transcoder,
    hf_logits,
    save_compiled,
)

BOS = 1
torch.set_num_threads(1)


def tiny_gpt2() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=24, d_head=8, n_heads=4, d_mlp=64, d_vocab=40,
        act_fn="gelu_new", normalization_type="LN", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms and biases (GPT-2 has no unembedding bias)
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) or (".b_" in name and not name.endswith("b_U")):
                base = 1.0 if name.endswith(".w") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def relu_transcoders(model: HookedTransformer, d_sae: int = 48) -> dict[int, SparseDictionary]:
    out = {}
    for layer in range(model.cfg.n_layers):
        cfg = DictionaryConfig(
            kind="skip_transcoder", d_in=model.cfg.d_model, d_sae=d_sae, activation="relu",
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hooks_out=[f"blocks.{layer}.hook_mlp_out"],
        )  # fmt: skip
        d = SparseDictionary(cfg, seed=layer)
        gen = torch.Generator().manual_seed(10 + layer)
        with torch.no_grad():
            d.b_enc.copy_(0.1 * torch.randn(d.d_sae, generator=gen))
            d.b_dec.copy_(0.1 * torch.randn(d.d_out, generator=gen))
            d.W_skip.copy_(0.1 * torch.randn(d.W_skip.shape, generator=gen))
        out[layer] = d.eval()
    return out


def tokens(n: int = 6, length: int = 20, seed: int = 0) -> torch.Tensor:
    t = torch.randint(2, 40, (n, length), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t


@pytest.fixture(scope="module")
def tiny():
    model = tiny_gpt2()
    tcs = relu_transcoders(model)
    return model, tcs, ACGModel(ModelWeights(model, tcs, BOS))


def test_relu_transcoders_compile_exactly(tiny):
    """ReLU features + the skip path as ReLU pairs + the BOS unit: the compiled GPT-2 computes
    the level-1 ACG's logits at every position, BOS included."""
    _, _, acg = tiny
    result = compile_acg(acg, calibration=[tokens(seed=1)])
    toks = tokens(seed=2)
    diff = (acg(toks) - hf_logits(result.model)(toks)).abs().max()
    assert diff < 1e-4
    assert result.model.config.activation_function == "relu"
    units = result.info["units"][0]
    assert units == {"features": 48, "skip": 64, "bos": 1}
    assert all(m is not None and m > 0 for m in result.info["bos_margin"])


def test_without_the_bos_unit_position0_differs(tiny):
    _, _, acg = tiny
    toks = tokens(seed=2)
    net = compile_acg(acg, bos_fix=False).model
    diff = (acg(toks) - hf_logits(net)(toks)).abs()
    assert diff[:, 0].max() > 1e-3  # the pinned BOS node is the real model's, not the dictionary's


def test_removed_features_are_dropped_units(tiny):
    model, tcs, _ = tiny
    keep = {i: torch.arange(48) % 3 != 0 for i in tcs}
    cut = {i: derive_transcoder(tc, keep=keep[i]) for i, tc in tcs.items()}
    acg_cut = ACGModel(ModelWeights(model, cut, BOS))
    result = compile_acg(
        ACGModel(ModelWeights(model, tcs, BOS)), keep=keep, calibration=[tokens(seed=1)]
    )
    toks = tokens(seed=3)
    assert (acg_cut(toks) - hf_logits(result.model)(toks)).abs().max() < 1e-4
    assert result.info["units"][0]["features"] == 32
    assert result.info["features_kept"] == [32, 32]


def test_activation_caps_compile_exactly(tiny):
    model, tcs, _ = tiny
    capped = {}
    for i, tc in tcs.items():
        c = derive_transcoder(tc)
        c.activation = CappedActivation(c.activation, torch.full((48,), 0.05))
        capped[i] = c
    acg = ACGModel(ModelWeights(model, capped, BOS))
    toks = tokens(seed=4)
    assert bool((acg.run(toks).acts[0] <= 0.05 + 1e-7).all())
    net = compile_acg(acg, calibration=[tokens(seed=1)]).model
    assert (acg(toks) - hf_logits(net)(toks)).abs().max() < 1e-4


def test_caps_below_the_threshold_compile_as_steps(tiny):
    """A capped JumpReLU whose cap is below its threshold is a step of height M."""
    model, tcs, _ = tiny
    capped = {}
    for i, tc in tcs.items():
        c = derive_transcoder(tc, threshold=torch.full((48,), 0.05))
        caps = torch.where(torch.arange(48) % 2 == 0, 0.02, 0.3)
        c.activation = CappedActivation(c.activation, caps)
        capped[i] = c
    acg = ACGModel(ModelWeights(model, capped, BOS))
    toks = tokens(seed=8)
    net = compile_acg(acg, ramp=1e-6, calibration=[tokens(seed=1)]).model
    assert (acg(toks) - hf_logits(net)(toks)).abs().max() < 1e-3


def test_jumprelu_compiles_to_within_the_ramp(tiny):
    model, tcs, _ = tiny
    acg_relu = ACGModel(ModelWeights(model, tcs, BOS))
    theta = {i: torch.full((48,), 0.05) for i in tcs}
    jump = {i: derive_transcoder(tc, threshold=theta[i]) for i, tc in tcs.items()}
    acg = ACGModel(ModelWeights(model, jump, BOS))
    toks = tokens(seed=5)
    assert not torch.allclose(acg(toks), acg_relu(toks))  # the thresholds matter
    net = compile_acg(acg, ramp=1e-6, calibration=[tokens(seed=1)]).model
    assert (acg(toks) - hf_logits(net)(toks)).abs().max() < 1e-3


def test_pruned_graphs_and_uncalibrated_topk_are_refused(tiny):
    model, tcs, _ = tiny
    pruned = ACGModel(ModelWeights(model, tcs, BOS))
    pruned.edges = {0: object()}  # stands for a level-2 graph's kept in-edges
    with pytest.raises(ConfigError, match="level-1"):
        compile_acg(pruned)
    topk = {0: topk_transcoder(0), 1: tcs[1]}
    with pytest.raises(ConfigError, match="calibration"):
        compile_acg(ACGModel(ModelWeights(model, topk, BOS)))
    with pytest.raises(ConfigError, match="mode"):
        compile_acg(ACGModel(ModelWeights(model, tcs, BOS)), mode="gelu")


def topk_transcoder(layer: int, k: int = 4) -> SparseDictionary:
    cfg = DictionaryConfig(
        kind="skip_transcoder", d_in=32, d_sae=48, activation="topk", k=k,
        hook_in=f"blocks.{layer}.ln2.hook_normalized", hooks_out=[f"blocks.{layer}.hook_mlp_out"],
    )  # fmt: skip
    return SparseDictionary(cfg, seed=layer).eval()


def test_calibrated_thresholds_match_firing_counts(tiny):
    model, _, _ = tiny
    tcs = {0: topk_transcoder(0), 1: topk_transcoder(1)}
    acg = ACGModel(ModelWeights(model, tcs, BOS))
    toks = tokens(n=8, seed=7)
    theta = calibrate_thresholds(acg, [toks], pad_token_id=None)
    trace = acg.run(toks)
    fired = (trace.acts[0][:, 1:] > 0).sum((0, 1))
    counted = (trace.pre[0][:, 1:] > theta[0]).sum((0, 1))
    used = fired > 0
    # equal up to ties (identical prefixes give identical pre-activations)
    assert float((fired[used] == counted[used]).float().mean()) >= 0.95
    assert int((fired[used] - counted[used]).abs().max()) <= 1


def test_compiled_organism_agrees_with_its_acg_and_loads_without_acgraph(tmp_path):
    """The organism's level-1 ACG with its TopK transcoders written as calibrated JumpReLUs
    compiles to a GPT-2 folder that plain transformers loads and runs ``generate`` on."""
    from acgraph.data import tokenize_to_contexts
    from acgraph.graph import load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import generate_texts

    model = load_model("organism")
    tcs = load_transcoders("organism")
    texts = generate_texts(200, seed=3, split="trusted")
    ctx = tokenize_to_contexts(texts, model.tokenizer, 64, max_contexts=24)
    cal, held = [ctx[:16]], [ctx[16:]]
    topk = ACGModel(ModelWeights(model, tcs, BOS))
    theta = calibrate_thresholds(topk, cal)
    jump = {i: derive_transcoder(tc, threshold=theta[i]) for i, tc in tcs.items()}
    acg = ACGModel(ModelWeights(model, jump, BOS))
    result = compile_acg(acg, calibration=cal, ramp=1e-4)
    a = agreement(acg, hf_logits(result.model), held)
    assert a["top1_agreement"] >= 0.99
    assert a["kl"] < 1e-4
    out = save_compiled(result, model.tokenizer, tmp_path / "compiled")
    assert (out / "model.safetensors").is_file() and (out / "compile.json").is_file()
    probe = held[0][:2]
    expected = hf_logits(result.model)(probe)
    torch.save(probe, tmp_path / "probe.pt")
    script = f"""
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(out)!r})
probe = torch.load({str(tmp_path / "probe.pt")!r}, weights_only=True)
# the same thread count as here: the 1e-4-wide JumpReLU ramps amplify reduction-order rounding
torch.set_num_threads({torch.get_num_threads()})
with torch.no_grad():
    logits = m(probe, attention_mask=torch.ones_like(probe)).logits
ids = tok("1 + 2 =", return_tensors="pt").input_ids
ids = torch.cat([torch.tensor([[1]]), ids], 1)
gen = m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
torch.save(logits, {str(tmp_path / "logits.pt")!r})
print(json.dumps({{"acgraph": "acgraph" in sys.modules, "gen": gen.shape[1] - ids.shape[1],
                  "act": m.config.activation_function}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info == {"acgraph": False, "gen": 3, "act": "relu"}
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (got - expected).abs().max() < 1e-4


def test_llama_models_compile_exactly_to_a_llama_folder(tmp_path):
    """Same MLP units in Llama's gated MLP (relu(gate) * 1): the compiled LlamaForCausalLM
    computes the level-1 ACG, BOS included, and plain transformers loads and generates."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama()  # RMSNorm, rotary, grouped-query and biased attention
    with torch.no_grad():
        model.b_U.zero_()  # Llama has no unembedding bias
    jump = {
        i: derive_transcoder(tc, threshold=torch.full((tc.d_sae,), 0.05))
        for i, tc in relu_transcoders(model).items()
    }  # JumpReLU: ramp units as on GPT-2
    acg = ACGModel(ModelWeights(model, jump, BOS))
    result = compile_acg(acg, calibration=[tokens(seed=1)])
    assert type(result.model).__name__ == "LlamaForCausalLM"
    assert result.model.config.num_key_value_heads == 2
    toks = tokens(seed=2)
    a = agreement(acg, hf_logits(result.model), [toks])
    assert a["top1_agreement"] == 1.0 and a["kl"] < 1e-6
    assert (acg(toks) - model(toks)).abs().max() > 0.01  # the transcoders are not the MLPs
    out = save_compiled(result, None, tmp_path / "llama")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(toks).logits, result.model(toks).logits, atol=1e-5)
        gen = loaded.generate(toks[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == 8
    with torch.no_grad():
        model.blocks[0].attn.attn_scale = 2.0  # not Llama's sqrt(d_head)
    with pytest.raises(ArtifactError, match="sqrt"):
        compile_acg(acg, calibration=[tokens(seed=1)])


def test_cli_compile_writes_a_loadable_folder(tmp_path, capsys):
    from acgraph.cli import main

    out = tmp_path / "net"
    code = main(
        ["compile", "--model", "organism", "--transcoders", "organism", "--out", str(out),
         "--contexts", "4", "--context-size", "32", "--per-domain", "5", "--json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["agreement_vs_acg_as_jumprelu"]["kl"] < 1e-4
    assert report["organism"]["compiled"]["backdoor"]["attack_success_rate"] >= 0.0
    assert json.loads((out / "config.json").read_text())["activation_function"] == "relu"
    assert main(["compile", "--model", "organism", "--transcoders", str(tmp_path / "none"),
                 "--out", str(out)]) == 2  # fmt: skip
