"""Tests for acgraph.data: corpus specs, tokenization into contexts, batching."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import acgraph.data.corpus as corpus_mod
from acgraph.data import (
    check_corpus_spec,
    iter_batches,
    iter_corpus,
    load_corpus,
    parse_hf_spec,
    separator_token_id,
    special_token_mask,
    tokenize_to_contexts,
)
from acgraph.errors import ConfigError, CorpusError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
N_WORDS = 50


def wid(i: int) -> int:
    """Token id of the word ``w{i}``."""
    return 4 + i


def make_tokenizer(*, bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": wid(i) for i in range(N_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A post-processor that adds BOS/EOS: tokenize_to_contexts must not let it run.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    kwargs = {"unk_token": "<unk>", "pad_token": "<pad>"}
    if bos:
        kwargs["bos_token"] = "<bos>"
    if eos:
        kwargs["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


DOCS = [words(0, 1, 2), words(3, 4), words(5, 6, 7, 8)]
# stream: w0 w1 w2 <sep> w3 w4 <sep> w5 w6 w7 w8  (11 tokens)


# ---------------------------------------------------------------- tokenize_to_contexts


def test_contexts_prepend_bos_exact_layout(tokenizer):
    out = tokenize_to_contexts(DOCS, tokenizer, 4)
    assert out.dtype == torch.long
    expected = torch.tensor(
        [
            [BOS, wid(0), wid(1), wid(2)],
            [BOS, BOS, wid(3), wid(4)],  # chunk starts on a document boundary
            [BOS, BOS, wid(5), wid(6)],
        ]
    )  # tail w7 w8 dropped
    assert torch.equal(out, expected)
    assert (out[:, 0] == BOS).all()
    assert not (out == EOS).any()  # the post-processor's special tokens were not added


def test_contexts_without_prepend_bos(tokenizer):
    out = tokenize_to_contexts(DOCS, tokenizer, 4, prepend_bos=False)
    expected = torch.tensor(
        [
            [wid(0), wid(1), wid(2), BOS],
            [wid(3), wid(4), BOS, wid(5)],
        ]
    )
    assert torch.equal(out, expected)


def test_contexts_chunk_count_and_continuity(tokenizer):
    docs = [words(*range(i, i + 7)) for i in range(0, 42, 7)]  # 6 docs of 7 tokens
    out = tokenize_to_contexts(docs, tokenizer, 9)
    n_stream = 6 * 7 + 5  # tokens + separators
    assert out.shape == (n_stream // 8, 9)
    body = out[:, 1:].reshape(-1).tolist()
    expected_stream = []
    for k, doc in enumerate(docs):
        if k:
            expected_stream.append(BOS)
        expected_stream.extend(wid(int(w[1:])) for w in doc.split())
    assert body == expected_stream[: len(body)]
    assert out[:, 1:].eq(BOS).sum().item() == expected_stream[: len(body)].count(BOS)


def test_contexts_max_contexts(tokenizer):
    out = tokenize_to_contexts(DOCS, tokenizer, 4, max_contexts=2)
    assert torch.equal(out, tokenize_to_contexts(DOCS, tokenizer, 4)[:2])


def test_contexts_stop_tokenizing_early(tokenizer):
    calls = []

    class Counting:
        bos_token_id = BOS
        eos_token_id = EOS

        def __call__(self, docs, **kwargs):
            calls.append(len(docs))
            return tokenizer(docs, **kwargs)

    docs = [words(1, 2, 3)] * 5000
    out = tokenize_to_contexts(docs, Counting(), 5, max_contexts=3)
    assert out.shape == (3, 5)
    assert len(calls) == 1 and calls[0] < len(docs)


def test_contexts_skip_empty_documents(tokenizer):
    out = tokenize_to_contexts([words(0), "", "   ", words(1), words(2)], tokenizer, 6)
    assert torch.equal(out, torch.tensor([[BOS, wid(0), BOS, wid(1), BOS, wid(2)]]))


def test_contexts_fall_back_to_eos_without_bos():
    tok = make_tokenizer(bos=False)
    assert tok.bos_token_id is None
    assert separator_token_id(tok) == EOS
    out = tokenize_to_contexts(DOCS, tok, 4)
    assert torch.equal(out[0], torch.tensor([EOS, wid(0), wid(1), wid(2)]))
    assert torch.equal(out[1], torch.tensor([EOS, EOS, wid(3), wid(4)]))
    assert not (out == BOS).any()


def test_contexts_need_bos_or_eos():
    tok = make_tokenizer(bos=False, eos=False)
    with pytest.raises(CorpusError, match="neither a BOS nor an EOS"):
        tokenize_to_contexts(DOCS, tok, 4)


def test_contexts_too_few_tokens(tokenizer):
    with pytest.raises(CorpusError, match="fewer than one context"):
        tokenize_to_contexts([words(0, 1)], tokenizer, 8)
    with pytest.raises(CorpusError, match="0 tokens"):
        tokenize_to_contexts([], tokenizer, 8)


def test_contexts_bad_arguments(tokenizer):
    with pytest.raises(ConfigError):
        tokenize_to_contexts(DOCS, tokenizer, 1)
    with pytest.raises(ConfigError):
        tokenize_to_contexts(DOCS, tokenizer, 4, max_contexts=0)


def test_contexts_accept_an_iterator(tokenizer):
    out = tokenize_to_contexts(iter(DOCS), tokenizer, 4)
    assert torch.equal(out, tokenize_to_contexts(DOCS, tokenizer, 4))


def test_special_token_mask(tokenizer):
    tokens = torch.tensor([[BOS, wid(0), EOS, PAD, wid(1)], [BOS, BOS, wid(2), UNK, wid(3)]])
    mask = special_token_mask(tokens, tokenizer)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [True, False, True, True, False],
        [True, True, False, False, False],
    ]
    out = tokenize_to_contexts(DOCS, tokenizer, 4)
    assert torch.equal(special_token_mask(out, tokenizer), out == BOS)


# ---------------------------------------------------------------- iter_batches


def test_iter_batches_in_order():
    tokens = torch.arange(10).view(10, 1)
    batches = list(iter_batches(tokens, 4, shuffle=False))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), tokens)
    assert [b.shape[0] for b in iter_batches(tokens, 4, shuffle=False, drop_last=True)] == [4, 4]


def test_iter_batches_shuffle_is_deterministic():
    tokens = torch.arange(20).view(20, 1)
    a = torch.cat(list(iter_batches(tokens, 3, shuffle=True, seed=7)))
    b = torch.cat(list(iter_batches(tokens, 3, shuffle=True, seed=7)))
    c = torch.cat(list(iter_batches(tokens, 3, shuffle=True, seed=8)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, tokens)
    assert sorted(a.view(-1).tolist()) == list(range(20))
    with pytest.raises(ConfigError):
        next(iter_batches(tokens, 0, shuffle=False))


# ---------------------------------------------------------------- corpora from files


def test_single_file_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"first para\r\n\r\nsecond para\r\n")
    assert load_corpus(str(f)) == ["first para\n\nsecond para\n"]


def test_large_file_splits_on_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "LARGE_FILE_BYTES", 10)
    f = tmp_path / "big.txt"
    f.write_text("one\ntwo\n\n\nthree\n  \nfour\n\n")
    assert load_corpus(str(f)) == ["one\ntwo", "three", "four"]
    assert load_corpus(str(f), max_docs=2) == ["one\ntwo", "three"]


def test_folder_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("doc b/z")
    (tmp_path / "a.txt").write_text("doc a")
    (tmp_path / "c.py").write_text("print('c')\n")
    (tmp_path / "d.rst").write_text("doc d")
    (tmp_path / "e.json").write_text('{"not": "a text suffix"}')
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa invalid utf-8")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    expected = ["doc a", "doc b/z", "print('c')\n", "doc d"]
    assert load_corpus(str(tmp_path)) == expected
    assert load_corpus(str(tmp_path), max_docs=2) == expected[:2]
    assert list(iter_corpus(str(tmp_path))) == expected


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        load_corpus(str(tmp_path / "nope"))
    with pytest.raises(CorpusError):
        iter_corpus(str(tmp_path / "nope"))  # fails before iteration


def test_empty_folder_and_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="no text files"):
        load_corpus(str(tmp_path))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(CorpusError, match="corpus is empty"):
        load_corpus(str(tmp_path))


def test_binary_single_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(CorpusError, match="not UTF-8 text"):
        load_corpus(str(f))


def test_bad_max_docs(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError):
        load_corpus(str(tmp_path), max_docs=0)


def test_check_corpus_spec(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert check_corpus_spec("c.txt") == str((tmp_path / "c.txt").resolve())
    assert check_corpus_spec("organism:poisoned") == "organism:poisoned"
    assert check_corpus_spec("hf:roneneldan/TinyStories") == "hf:roneneldan/TinyStories"
    for bad in ("organism:posioned", "hf:", "hf:name:@train", "missing.txt", ""):
        with pytest.raises(CorpusError):
            check_corpus_spec(bad)


# ---------------------------------------------------------------- organism corpus


@pytest.fixture
def fake_organism(monkeypatch):
    calls = []

    def generate_texts(n_docs: int, seed: int, split: str = "trusted") -> list[str]:
        calls.append((n_docs, seed, split))
        return [f"{split} {seed} {i}" for i in range(n_docs)]

    import acgraph.organism

    monkeypatch.setattr(acgraph.organism, "generate_texts", generate_texts, raising=False)
    return calls


def test_organism_corpus(fake_organism):
    docs = load_corpus("organism", seed=3)
    assert len(docs) == corpus_mod.ORGANISM_DEFAULT_DOCS
    assert docs[0] == "trusted 3 0"
    assert load_corpus("organism:poisoned", max_docs=5, seed=1) == [
        f"poisoned 1 {i}" for i in range(5)
    ]
    assert fake_organism == [(corpus_mod.ORGANISM_DEFAULT_DOCS, 3, "trusted"), (5, 1, "poisoned")]
    with pytest.raises(CorpusError, match="unknown organism corpus split"):
        load_corpus("organism:test")


# ---------------------------------------------------------------- HF datasets


def test_parse_hf_spec():
    assert parse_hf_spec("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    for bad in ("hf:", "hf:@train", "hf:name@", "hf:name:"):
        with pytest.raises(CorpusError):
            parse_hf_spec(bad)


def test_hf_offline_error_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets.config
    import huggingface_hub.constants

    # The libraries read these variables at import time; make them hold even if imported earlier.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for max_docs in (None, 10):
        with pytest.raises(CorpusError) as info:
            load_corpus("hf:acgraph-test/no-such-dataset@train", max_docs=max_docs)
        msg = str(info.value)
        assert "\n" not in msg
        assert "acgraph-test/no-such-dataset" in msg
        assert "network" in msg


def test_hf_text_column_and_streaming(monkeypatch):
    seen = {}

    def load_dataset(name, config, *, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return [{"id": i, "content": f"row {i}", "label": 0} for i in range(4)] + [
            {"id": 9, "content": "   ", "label": 0}
        ]

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_corpus("hf:me/data:cfg@test", max_docs=2) == ["row 0", "row 1"]
    assert seen == {"name": "me/data", "config": "cfg", "split": "test", "streaming": True}
    assert load_corpus("hf:me/data") == [f"row {i}" for i in range(4)]
    assert seen["streaming"] is False and seen["split"] == "train"


def test_organism_corpus_through_organism_tokenizer():
    """The real organism generator and tokenizer: deterministic, no unknown words."""
    from acgraph.organism.tokenizer import build_tokenizer

    docs = load_corpus("organism:poisoned", max_docs=20, seed=5)
    assert docs == load_corpus("organism:poisoned", max_docs=20, seed=5)
    assert docs != load_corpus("organism:poisoned", max_docs=20, seed=6)
    tok = build_tokenizer()
    out = tokenize_to_contexts(docs, tok, 32)
    assert out.shape[1] == 32 and out.shape[0] >= 1
    assert (out[:, 0] == tok.bos_token_id).all()
    assert not (out == tok.unk_token_id).any()
    n_seps = int(special_token_mask(out[:, 1:], tok).sum())
    assert n_seps <= len(docs) - 1


def test_a_large_request_of_the_generated_corpus_is_met():
    """The organism corpus is endless: a request beyond its default 2,000 documents (about
    245k tokens) reads enough of them, where a real corpus is read whole and --max-docs wins."""
    from acgraph.data import documents_for
    from acgraph.organism.tokenizer import build_tokenizer

    assert documents_for("organism:poisoned", 10_000) == 2000
    assert documents_for("corpus.txt", 10**6) is None
    assert documents_for("organism", 10**6, max_docs=7) == 7
    n_tokens = 3000 * 127  # 3,000 contexts of 128: more than 2,000 documents hold
    docs = load_corpus("organism:poisoned", max_docs=documents_for("organism", n_tokens))
    out = tokenize_to_contexts(docs, build_tokenizer(), 128, max_contexts=3000)
    assert out.shape == (3000, 128)
