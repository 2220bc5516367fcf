"""Corpora and tokenization into fixed-length contexts.

Activation streaming (bounded shuffle buffer, on-disk shards) will live here too.
"""

from acgraph.data.contexts import (
    iter_batches,
    separator_token_id,
    special_token_mask,
    tokenize_to_contexts,
)
from acgraph.data.corpus import (
    check_corpus_spec,
    documents_for,
    iter_corpus,
    load_corpus,
    parse_hf_spec,
    parse_organism_spec,
)

__all__ = [
    "check_corpus_spec",
    "documents_for",
    "iter_batches",
    "iter_corpus",
    "load_corpus",
    "parse_hf_spec",
    "parse_organism_spec",
    "separator_token_id",
    "special_token_mask",
    "tokenize_to_contexts",
]
