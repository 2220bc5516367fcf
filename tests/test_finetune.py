"""End-to-end fine-tuning of transcoders (`acg finetune`): lowers the spliced model's KL,
checkpoints and resumes exactly, and its output is what the ACG then runs on."""

from __future__ import annotations

import json

import pytest
import torch

from acgraph.cli import main
from acgraph.dictionaries.finetune import finetune_end_to_end
from acgraph.errors import ConfigError
from acgraph.graph import ACGModel, ModelWeights, load_transcoders

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def organism():
    from acgraph.data import tokenize_to_contexts
    from acgraph.models import load_model
    from acgraph.organism import generate_texts

    model = load_model("organism")
    texts = generate_texts(400, seed=11, split="trusted")
    rows = list(tokenize_to_contexts(texts, model.tokenizer, 64, max_contexts=64).split(16))
    return model, rows


@torch.no_grad()
def _kl(model, tcs, tokens) -> float:
    """KL(model ‖ level-1 ACG) over non-BOS positions."""
    ref = model(tokens).log_softmax(-1)[:, 1:]
    acg = ACGModel(ModelWeights(model, tcs, model.tokenizer.bos_token_id))(tokens)
    got = acg.log_softmax(-1)[:, 1:]
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def test_finetuning_lowers_the_kl_of_the_acg(organism):
    model, rows = organism
    tcs = load_transcoders("organism")  # a private copy: fine-tuning changes it
    held_out = rows[3]
    before = _kl(model, tcs, held_out)
    losses = finetune_end_to_end(model, tcs, rows[:3], steps=20, lr=1e-4, progress=False)
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert not any(p.requires_grad for tc in tcs.values() for p in tc.parameters())
    assert _kl(model, tcs, held_out) < before
    with pytest.raises(ConfigError):
        finetune_end_to_end(model, tcs, [], steps=2)


def test_a_resumed_run_matches_an_uninterrupted_one(organism, tmp_path):
    model, rows = organism
    straight = load_transcoders("organism")
    ref = finetune_end_to_end(model, straight, rows[:1], steps=4, lr=3e-4, progress=False)
    ckpt = tmp_path / "ckpt.safetensors"
    first = load_transcoders("organism")
    finetune_end_to_end(model, first, rows[:1], steps=2, lr=3e-4, checkpoint=ckpt, progress=False)
    with pytest.raises(ConfigError, match="resume"):
        finetune_end_to_end(model, first, rows[:1], steps=4, checkpoint=ckpt, progress=False)
    resumed = load_transcoders("organism")  # fresh weights: everything comes from the file
    losses = finetune_end_to_end(
        model, resumed, rows[:1], steps=4, lr=3e-4, checkpoint=ckpt, resume=True, progress=False
    )
    assert losses == pytest.approx(ref, rel=1e-5)
    for layer, tc in straight.items():
        assert torch.allclose(tc.W_enc, resumed[layer].W_enc, atol=1e-6)


def test_cli_writes_transcoders_the_graph_loads(tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", "organism", "--model", "organism", "--corpus", "organism:trusted"]
    argv += ["--contexts", "16", "--context-size", "64", "--steps", "4", "--rows", "4"]
    assert main([*argv, "--out", str(out), "--threads", "1"]) == 0
    assert "fine-tuned 3 transcoders" in capsys.readouterr().out
    report = json.loads((out / "finetune.json").read_text())
    assert report["steps"] == 4 and report["kl_first"] > 0 and report["lr_decay"] == 0.5
    tuned = load_transcoders(str(out))
    shipped = load_transcoders("organism")
    assert sorted(tuned) == sorted(shipped)
    assert not torch.equal(tuned[0].W_enc, shipped[0].W_enc)
    assert main([*argv, "--out", str(out)]) == 2  # a finished run is not overwritten silently
    assert "resume" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--contexts", "0"]) == 2
    # --lr-decay reaches the optimizer: same contexts and seed, other weights
    constant = tmp_path / "constant"
    assert main([*argv, "--out", str(constant), "--threads", "1", "--lr-decay", "0"]) == 0
    assert json.loads((constant / "finetune.json").read_text())["lr_decay"] == 0
    assert not torch.equal(load_transcoders(str(constant))[0].W_enc, tuned[0].W_enc)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "bad"), "--lr-decay", "2"]) == 2
    assert "--lr-decay must be in 0..1" in capsys.readouterr().err


def test_lr_decay_falls_linearly_to_zero_over_the_last_steps():
    from acgraph.dictionaries.finetune import kl_training
    from acgraph.dictionaries.training import decayed_lr

    assert [decayed_lr(s, 8, 1.0, 0.5) for s in range(8)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [decayed_lr(s, 3, 2.0, 0.0) for s in range(3)] == [2.0, 2.0, 2.0]
    # a constant-sign gradient moves each Adam parameter by about its step's rate, so the
    # distance travelled is the sum of the rates: 4 with a constant rate, 2.5 with full decay
    target = torch.arange(7.0).expand(1, 5, 7)  # every logit's gradient clearly nonzero
    data = torch.zeros(4, 5, dtype=torch.long)
    moved = {}
    for decay in (0.0, 1.0):
        bias = torch.zeros(7, requires_grad=True)
        kl_training(
            lambda batch: target.expand(len(batch), -1, -1), {"bias": bias}, data,
            lambda batch, mask, bias=bias: torch.zeros(len(batch), 5, 7) + bias,
            steps=4, lr=1e-3, rows=2, lr_decay=decay, progress=False,
        )  # fmt: skip
        moved[decay] = bias.detach().abs()
    assert torch.allclose(moved[0.0], torch.full((7,), 4e-3), rtol=0.02)
    assert torch.allclose(moved[1.0], torch.full((7,), 2.5e-3), rtol=0.02)
    with pytest.raises(ConfigError, match="lr_decay"):
        kl_training(None, {"bias": bias}, data, None, steps=2, lr=1e-3, lr_decay=1.5)
