"""Tokenize documents into fixed-length contexts (the SAELens convention) and batch them.

Layout, with ``S`` the separator id (the tokenizer's BOS, or EOS when it has no BOS)::

    stream   = doc_0  S  doc_1  S  doc_2 ...        (documents tokenized without special tokens)
    contexts = [BOS | stream[0:L]], [BOS | stream[L:2L]], ...     L = context_size - 1

With ``prepend_bos=False`` each context is ``stream[k*L:(k+1)*L]`` with ``L = context_size``.
The ragged tail of the stream is dropped. A context may begin ``BOS S`` when a chunk starts
on a document boundary. :func:`special_token_mask` marks BOS/separator/EOS/padding positions so
activation statistics can leave them out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from acgraph.errors import ConfigError, CorpusError

_DOCS_PER_BATCH = 1024


def separator_token_id(tokenizer: Any) -> int:
    """The id placed between documents and at the start of contexts: BOS, else EOS."""
    for attr in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            return int(token_id)
    raise CorpusError("tokenizer has neither a BOS nor an EOS token; cannot separate documents")


def _encode(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    # verbose=False: no "longer than the model's maximum length" warning; documents are
    # cut into contexts afterwards. A fast tokenizer encodes the batch in parallel (Rust).
    encoded = tokenizer(
        docs,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return encoded["input_ids"]


def _progress(texts: Iterable[str], enabled: bool):
    from acgraph.progress import progress_bar

    total = len(texts) if isinstance(texts, Sequence) else None
    return progress_bar(
        total=total,
        desc="tokenizing",
        unit="doc",
        enabled=enabled,
        leave=False,
    )


def tokenize_to_contexts(
    texts: Iterable[str],
    tokenizer: Any,
    context_size: int,
    *,
    prepend_bos: bool = True,
    max_contexts: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Tokenize documents into a ``[n_contexts, context_size]`` int64 tensor (see module doc).

    ``tokenizer`` is a Hugging Face tokenizer (callable, with ``bos_token_id``/``eos_token_id``).
    Tokenization stops as soon as ``max_contexts`` contexts are filled. Raises CorpusError when
    the corpus does not fill a single context.
    """
    if isinstance(context_size, bool) or not isinstance(context_size, int):
        raise ConfigError(f"context_size must be an integer, got {context_size!r}")
    min_size = 2 if prepend_bos else 1
    if context_size < min_size:
        raise ConfigError(f"context_size must be at least {min_size}, got {context_size}")
    if max_contexts is not None and (isinstance(max_contexts, bool) or max_contexts < 1):
        raise ConfigError(f"max_contexts must be a positive integer, got {max_contexts!r}")
    if isinstance(texts, str):
        texts = [texts]

    sep = separator_token_id(tokenizer)
    chunk = context_size - 1 if prepend_bos else context_size
    needed = None if max_contexts is None else max_contexts * chunk

    pieces: list[np.ndarray] = []
    n_tokens = 0
    first_doc = True
    docs_iter = iter(texts)
    with _progress(texts, progress) as bar:
        while needed is None or n_tokens < needed:
            docs = list(itertools.islice(docs_iter, _DOCS_PER_BATCH))
            if not docs:
                break
            flat: list[int] = []
            for ids in _encode(tokenizer, docs):
                if not ids:
                    continue
                if not first_doc:
                    flat.append(sep)
                first_doc = False
                flat.extend(ids)
            if flat:
                pieces.append(np.asarray(flat, dtype=np.int64))
                n_tokens += len(flat)
            bar.update(len(docs))

    n_contexts = n_tokens // chunk
    if max_contexts is not None:
        n_contexts = min(n_contexts, max_contexts)
    if n_contexts == 0:
        raise CorpusError(
            f"corpus has {n_tokens} tokens, fewer than one context "
            f"(context_size={context_size} needs {chunk} tokens)"
        )
    stream = np.concatenate(pieces)[: n_contexts * chunk]
    body = torch.from_numpy(stream).view(n_contexts, chunk)
    if not prepend_bos:
        return body.clone()
    out = torch.empty((n_contexts, context_size), dtype=torch.long)
    out[:, 0] = sep
    out[:, 1:] = body
    return out


def special_token_mask(tokens: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Boolean mask, same shape as ``tokens``: True at BOS, EOS, separator and padding ids."""
    ids = {separator_token_id(tokenizer)}
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            ids.add(int(token_id))
    special = torch.tensor(sorted(ids), dtype=tokens.dtype, device=tokens.device)
    return torch.isin(tokens, special)


def valid_positions(
    tokens: torch.Tensor, pad_token_id: int | None = None, *, bos: bool = False
) -> torch.Tensor:
    """``[B, T]`` bool: the positions a replacement is scored and fitted on. Position 0 (the
    BOS, a constant of the model) is left out unless ``bos``; padding always is."""
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = bos
    if pad_token_id is not None:
        mask &= tokens != pad_token_id
    return mask


def iter_batches(
    tokens: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield ``tokens`` in batches of ``batch_size`` rows.

    With ``shuffle`` the row order is a permutation fixed by ``seed`` (the same seed gives the
    same batches on every run and machine). The last batch may be smaller unless ``drop_last``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = tokens.shape[0]
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator).to(tokens.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        yield tokens[start:end] if order is None else tokens[order[start:end]]
