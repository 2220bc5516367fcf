"""`acg train` / `acg eval` end to end on a tiny GPT-2 folder and a text corpus."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from acgraph.cli import dictionaries as cli
from acgraph.errors import ACGError

torch.set_num_threads(1)

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(vocab),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=1,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    docs = []
    for _ in range(200):
        ids = torch.randint(
            0, len(WORDS), (int(torch.randint(5, 30, (1,), generator=gen)),), generator=gen
        )
        docs.append(" ".join(WORDS[i] for i in ids))
    path.write_text("\n\n".join(docs))
    return path


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="acg")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_then_eval(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "dicts"
    common = ["--model", str(model_dir), "--corpus", str(corpus), "--context-size", "16"]
    argv = ["train", *common, "--kind", "skip_transcoder", "--k", "4", "--width", "64"]
    argv += [
        "--tokens",
        "6144",
        "--batch-size",
        "256",
        "--buffer-tokens",
        "1024",
        "--out",
        str(out),
    ]
    assert run(argv) == 0
    names = sorted(p.name for p in out.iterdir() if (p / "cfg.json").is_file())
    assert names == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    cfg = json.loads((out / names[0] / "cfg.json").read_text())
    # SAELens 6.54 has no TopK skip transcoder: written as its JumpReLU one (approximation),
    # read back by acgraph as TopK
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert cfg["acgraph"]["config"]["activation"] == "topk"
    assert cfg["metadata"]["hook_name"] == "blocks.0.ln2.hook_normalized"
    # resuming a finished run is a no-op that succeeds; not resuming is refused
    assert run([*argv, "--resume"]) == 0
    with pytest.raises(ACGError, match="resume"):
        run(argv)
    capsys.readouterr()
    assert run(["eval", str(out), *common, "--contexts", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["dictionaries"]) == set(names)
    for key in ("ce_recovered_zero", "ce_recovered_mean", "delta_ce", "kl"):
        assert key in report["all"]
    assert 0.0 <= report["all"]["top1_agreement_confident"] <= 1.0
    # --joint-only: the same joint splice, no one-at-a-time rows
    assert run(["eval", str(out), *common, "--contexts", "16", "--json", "--joint-only"]) == 0
    joint = json.loads(capsys.readouterr().out)
    assert joint["all"]["kl"] == pytest.approx(report["all"]["kl"], rel=1e-9)
    assert joint["all"]["top1_agreement"] == report["all"]["top1_agreement"]
    assert all("kl" not in e and "fvu" in e for e in joint["dictionaries"].values())
    assert run(["eval", str(out), *common, "--contexts", "8", "--joint-only"]) == 0
    assert "all spliced at once" in capsys.readouterr().out
    assert run(["eval", str(out / names[1]), *common, "--contexts", "8"]) == 0
    assert "recov(mean)" in capsys.readouterr().out


def test_cli_errors(model_dir, corpus, tmp_path):
    common = ["--model", str(model_dir), "--corpus", str(corpus), "--context-size", "16"]
    with pytest.raises(ACGError, match="IN:OUT"):
        run(
            [
                "train",
                *common,
                "--hooks",
                "blocks.0.hook_mlp_out",
                "--tokens",
                "512",
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(ACGError, match="does not exist"):
        run(
            ["train", *common, "--kind", "sae", "--hooks", "blocks.9.hook_resid_post"]
            + ["--tokens", "512", "--out", str(tmp_path)]
        )
    with pytest.raises(ACGError, match="no dictionary"):
        run(["eval", str(tmp_path), *common])


def test_train_into_a_workspace(model_dir, corpus, tmp_path):
    from acgraph.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws", str(model_dir), str(corpus))
    argv = ["train", "--workspace", str(ws.path), "--context-size", "16", "--layers", "1"]
    argv += ["--kind", "sae", "--activation", "relu", "--width", "64", "--tokens", "1024"]
    argv += ["--b-dec-init", "geometric_median"]
    assert run([*argv, "--batch-size", "256", "--buffer-tokens", "1024"]) == 0
    saved = ws.dictionaries_dir / "blocks.1.hook_resid_post"
    cfg = json.loads((saved / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["metadata"]["model_name"] == str(model_dir)
