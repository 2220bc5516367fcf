"""A cleaned graph's key-previous attention mask compiled into the GPT-2 `acg compile` writes:
a flag block in front and a wider residual stream, measured against the masked ACG."""

from __future__ import annotations

import json

import pytest
import torch

from acgraph.errors import ConfigError
from acgraph.graph import ACGModel, ModelWeights
from acgraph.graph.attention_bounds import attention_peaks
from acgraph.safety.compile import (
    agreement,
    calibrate_thresholds,
    compile_acg,
    derive_transcoder,
    hf_logits,
    save_compiled,
)
from acgraph.safety.compile_mask import EPS_FLAG, Layout, compile_key_previous_mask

BOS = 1
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def masked(trusted_organism):
    """The organism's JumpReLU ACG, its key-previous mask from trusted text, and the compile."""
    model, tcs, trusted = trusted_organism
    theta = calibrate_thresholds(ACGModel(ModelWeights(model, tcs, BOS)), trusted[:1])
    jump = {i: derive_transcoder(tc, threshold=theta[i]) for i, tc in tcs.items()}
    plain = ACGModel(ModelWeights(model, jump, BOS))
    bounds = attention_peaks(plain, trusted, 0.0, kind="key-previous", mode="mask")
    acg = ACGModel(ModelWeights(model, jump, BOS, bounds))
    return model, plain, acg, compile_acg(acg, calibration=trusted[:1]), trusted


def _shuffled(batch: torch.Tensor) -> torch.Tensor:
    """Tokens put next to each other in ways trusted text never did (BOS kept first)."""
    g = torch.Generator().manual_seed(0)
    odd = batch.clone()
    odd[:, 1:] = odd[:, 1:][:, torch.randperm(odd.shape[1] - 1, generator=g)]
    return odd


def test_the_flag_block_computes_every_heads_mask(masked):
    model, _, acg, result, trusted = masked
    net, bounds = result.model, acg.w.attention_bounds
    cfg = model.cfg
    lay = Layout(cfg.d_model, cfg.d_vocab, cfg.n_ctx, cfg.n_layers * cfg.n_heads, cfg.n_heads)
    assert net.config.n_layer == cfg.n_layers + 1 and net.config.n_embd == lay.width
    assert result.info["attention_bounds"].startswith("compiled")
    for toks in (trusted[1], _shuffled(trusted[1])):
        with torch.no_grad():
            hidden = net(toks, output_hidden_states=True).hidden_states[1]
        flags = hidden[..., lay.flag : lay.flag + lay.flags] / EPS_FLAG  # [B, T, L*H]
        want = torch.stack(
            [~bounds.allowed(layer, toks)[:, :, -1] for layer in range(cfg.n_layers)], 2
        )  # the last query sees every key; key-previous masks do not depend on the query
        want = want.permute(0, 3, 2, 1).reshape(flags.shape).float()
        assert torch.allclose(flags, want, atol=1e-3)
        # the codes the block used are erased: the model's blocks see (almost) nothing extra
        assert float(hidden[..., lay.cur : lay.prev].abs().max()) < 1e-3


def test_the_compiled_mask_runs_like_the_masked_graph_and_loads_with_transformers(masked, tmp_path):
    from transformers import AutoModelForCausalLM

    model, plain, acg, result, trusted = masked
    odd = _shuffled(trusted[1])
    assert not torch.allclose(acg(odd), plain(odd), atol=1e-2)  # the mask acts here
    for toks in (trusted[1], odd):
        a = agreement(acg, hf_logits(result.model), [toks])
        assert a["top1_agreement"] >= 0.99 and a["kl"] < 1e-4
    unmasked = compile_acg(plain, calibration=trusted[:1]).model
    assert agreement(acg, hf_logits(unmasked), [odd])["kl"] > 100 * a["kl"]
    out = save_compiled(result, model.tokenizer, tmp_path / "compiled")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(odd).logits, result.model(odd).logits, atol=1e-4)
        gen = loaded.generate(odd[:1, :10], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == 13


def test_only_key_previous_masks_compile(masked):
    model, plain, _, result, trusted = masked
    jump = dict(enumerate(plain.w.transcoders))
    cap = attention_peaks(plain, trusted[:1], 0.1)  # key-bigram cap: not expressible
    with pytest.raises(ConfigError, match="key-previous"):
        compile_key_previous_mask(result.model, cap, trusted[:1])
    info = compile_acg(ACGModel(ModelWeights(model, jump, BOS, cap)),
                       calibration=trusted[:1]).info  # fmt: skip
    assert info["attention_bounds"] == "not compiled"


def test_cli_clean_with_a_mask_then_compile_carries_it(tmp_path, capsys):
    from acgraph.cli import main

    clean, net = tmp_path / "clean", tmp_path / "net"
    common = ["--model", "organism", "--context-size", "32", "--per-domain", "5"]
    code = main(
        ["clean", *common, "--transcoders", "organism", "--corpus", "organism:trusted",
         "--contexts", "16", "--attention-contexts", "16", "--attention-kind", "key-previous",
         "--attention-mode", "mask", "--attention-floor", "0.02", "--out", str(clean)]
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()
    code = main(["compile", *common, "--transcoders", str(clean), "--out", str(net),
                 "--contexts", "4"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "attention bounds: compiled (key-previous mask" in printed
    assert json.loads((net / "config.json").read_text())["n_layer"] == 4  # flag block + 3
    assert json.loads((net / "compile.json").read_text())["attention_bounds"].startswith("compiled")
