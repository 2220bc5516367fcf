"""Attention bounds: per head, the most attention trusted data ever put on a key token in its
context, enforced when the graph runs.

A backdoor can live entirely in *where* a head looks: the value it reads is ordinary, but no
trusted input ever made that head attend there (docs/clean.md). A bound caps each weight of
the pattern at ``max(peak, floor)``, where ``peak`` is the largest weight trusted data gave
the same token pair in that head and ``floor`` is what any pair may reach, seen or not
(trusted text cannot cover every pair). Two pair kinds:

- ``key-bigram`` (default): the key token and the token after it (where the query can see
  that one, i.e. the key is not the query itself): attention onto a token in a local context
  trusted text never showed;
- ``query-key``: the query token and the key token: who attends to whom.

The mass a cap removes goes to position 0, the BOS node: attending to BOS is how heads already
do nothing. Both tokens are token nodes of the graph, so the gate stays computed from graph
nodes alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ArtifactError, ConfigError
from acgraph.io import atomic_save_tensors, load_tensors

FILENAME = "attention_bounds.safetensors"
KINDS = ("key-bigram", "query-key")


def pair_ids(tokens: Tensor, vocab: int, kind: str) -> Tensor:
    """``[B, T, T]``: the id of the token pair that keys the bound of query t on key u."""
    base = vocab + 1  # one more symbol: "no next token visible"
    if kind == "query-key":
        return tokens[:, :, None] * base + tokens[:, None, :]
    if kind != "key-bigram":
        raise ConfigError(f"unknown attention-bound kind {kind!r} (choose from {', '.join(KINDS)})")
    B, T = tokens.shape
    after = torch.cat([tokens[:, 1:], tokens.new_full((B, 1), vocab)], 1)  # [B, T]
    pos = torch.arange(T, device=tokens.device)
    visible = pos[:, None] > pos[None, :]  # [query, key]: the key's next token is not later
    second = torch.where(visible, after[:, None, :], tokens.new_tensor(vocab))
    return tokens[:, None, :] * base + second


@dataclass
class AttentionBounds:
    pairs: Tensor  # [n] int64, sorted: the ids (pair_ids) of every pair seen
    peak: Tensor  # [n_layers, n_heads, n]: the largest weight trusted data gave the pair
    vocab: int
    floor: float  # the weight any pair may reach
    kind: str = KINDS[0]

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise ConfigError(f"the attention floor must be in [0, 1], got {self.floor}")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown attention-bound kind {self.kind!r}")

    @property
    def n_layers(self) -> int:
        return self.peak.shape[0]

    def limits(self, layer: int, tokens: Tensor) -> Tensor:
        """``[B, H, T, T]``: the most weight query t may put on key u."""
        pair = pair_ids(tokens, self.vocab, self.kind).to(self.pairs.device)
        at = torch.searchsorted(self.pairs, pair).clamp(max=max(len(self.pairs) - 1, 0))
        seen = self.pairs[at] == pair if len(self.pairs) else torch.zeros_like(pair, dtype=bool)
        peak = self.peak[layer][:, at].transpose(0, 1)  # [B, H, T, T]
        peak = torch.where(seen[:, None], peak, torch.zeros_like(peak))
        return peak.clamp(min=self.floor)

    def excess(self, layer: int, pattern: Tensor, tokens: Tensor) -> Tensor:
        """``[B, H, T, T]``: how far each weight of ``pattern`` goes beyond its limit (0 within)."""
        return (pattern - self.limits(layer, tokens).to(pattern)).clamp(min=0)

    def apply(self, layer: int, pattern: Tensor, tokens: Tensor) -> Tensor:
        """``pattern`` with every weight capped at its limit, the excess moved to BOS."""
        if layer >= self.n_layers:
            return pattern
        over = self.excess(layer, pattern, tokens)
        capped = pattern - over
        capped[..., 0] += over.sum(-1)
        return capped

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILENAME
        meta = torch.tensor([self.vocab, KINDS.index(self.kind)], dtype=torch.int64)
        floor = torch.tensor([self.floor], dtype=torch.float64)
        atomic_save_tensors(
            path, {"pairs": self.pairs, "peak": self.peak, "meta": meta, "floor": floor}
        )
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AttentionBounds | None:
        """The bounds stored in ``folder``, or None where it holds none."""
        path = Path(folder) / FILENAME
        if not path.is_file():
            return None
        t = load_tensors(path)
        if set(t) != {"pairs", "peak", "meta", "floor"} or t["peak"].dim() != 3:
            raise ArtifactError(f"{path} is not an attention-bounds file")
        if t["peak"].shape[2] != len(t["pairs"]) or not 0 <= int(t["meta"][1]) < len(KINDS):
            raise ArtifactError(f"{path}: a damaged attention-bounds file")
        vocab, kind = int(t["meta"][0]), KINDS[int(t["meta"][1])]
        return cls(t["pairs"], t["peak"], vocab, float(t["floor"][0]), kind)


class PeakAttention:
    """Accumulates, over runs, the largest weight each (layer, head, token pair of ``kind``)
    received (causal pairs of valid query positions only)."""

    def __init__(self, vocab: int, kind: str = KINDS[0]):
        self.vocab, self.kind = vocab, kind
        self.pairs = torch.zeros(0, dtype=torch.int64)
        self.peak: Tensor | None = None  # [L, H, n]

    def add(self, patterns: list[Tensor], tokens: Tensor, valid: Tensor) -> None:
        """``patterns``: per layer ``[B, H, T, T]``; ``valid``: ``[B, T]`` query positions."""
        T = tokens.shape[1]
        pair = pair_ids(tokens, self.vocab, self.kind)  # [B, Tq, Tk]
        where = valid[:, :, None] & torch.ones(T, T, dtype=torch.bool).tril()
        new = torch.stack([p.permute(1, 0, 2, 3)[:, where] for p in patterns])  # [L, H, m]
        pairs = torch.cat([self.pairs, pair[where]])
        values = new if self.peak is None else torch.cat([self.peak, new], -1)
        self.pairs, inverse = torch.unique(pairs, return_inverse=True)
        out = torch.zeros(*values.shape[:2], len(self.pairs), dtype=values.dtype)
        index = inverse.expand_as(values)
        self.peak = out.scatter_reduce_(-1, index, values, "amax", include_self=False)

    def bounds(self, floor: float) -> AttentionBounds:
        if self.peak is None:
            raise ConfigError("no trusted positions to measure attention on")
        return AttentionBounds(self.pairs, self.peak.float(), self.vocab, floor, self.kind)


@torch.no_grad()
def attention_peaks(
    acg: Any,
    batches: Iterable[Tensor],
    floor: float,
    pad_token_id: int | None = 0,
    kind: str = KINDS[0],
) -> AttentionBounds:
    """The bounds of :mod:`acgraph.graph.attention_bounds` from the largest weight each head
    gave each token pair of ``kind`` on ``batches`` (non-pad query positions)."""
    peaks = PeakAttention(acg.w.cfg.d_vocab, kind)
    for tokens in batches:
        trace = acg.run(tokens)
        valid = torch.ones_like(trace.tokens, dtype=torch.bool)
        if pad_token_id is not None:
            valid &= trace.tokens != pad_token_id
        peaks.add(trace.pattern, trace.tokens, valid)
    return peaks.bounds(floor)
