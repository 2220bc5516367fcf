"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def trusted_organism():
    """The shipped organism, its shipped transcoders and 32 trusted contexts of 64 tokens
    (two batches of 16), as `acg clean` and the attention bounds take them."""
    from acgraph.data import tokenize_to_contexts
    from acgraph.graph import load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import generate_texts

    model = load_model("organism")
    texts = generate_texts(200, seed=11, split="trusted")
    trusted = list(tokenize_to_contexts(texts, model.tokenizer, 64, max_contexts=32).split(16))
    return model, load_transcoders("organism"), trusted
