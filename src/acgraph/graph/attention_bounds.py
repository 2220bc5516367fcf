"""Attention bounds: per head, the most attention trusted data ever put on a key token in its
context, enforced when the graph runs.

A backdoor can live entirely in *where* a head looks: the value it reads is ordinary, but no
trusted input ever made that head attend there (docs/clean.md). A bound caps each weight of
the pattern at ``max(peak, floor)``, where ``peak`` is the largest weight trusted data gave
the same token pair in that head and ``floor`` is what any pair may reach, seen or not
(trusted text cannot cover every pair). Three pair kinds:

- ``key-bigram`` (default): the key token and the token after it (where the query can see
  that one, i.e. the key is not the query itself): attention onto a token in a local context
  trusted text never showed;
- ``key-previous``: the key token and the token before it. A property of the key position
  alone, known causally there, which is what a network's own keys could carry;
- ``query-key``: the query token and the key token: who attends to whom.

Two modes:

- ``cap`` (default): each weight is cut to its limit and the mass removed goes to position 0,
  the BOS node (attending to BOS is how heads already do nothing);
- ``mask``: keys whose pair trusted data gave less than ``floor`` (or never showed) get no
  weight and the rest of the row is renormalized: exactly a ``-inf`` added to their scores
  before the softmax, the form a GPT-2 attention mask takes. BOS is never masked.

Both tokens are token nodes of the graph, so the gate stays computed from graph nodes alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.errors import ArtifactError, ConfigError
from acgraph.io import atomic_save_tensors, load_tensors

FILENAME = "attention_bounds.safetensors"
KINDS = ("key-bigram", "query-key", "key-previous")  # file format: index into this tuple
MODES = ("cap", "mask")


def pair_ids(tokens: Tensor, vocab: int, kind: str) -> Tensor:
    """``[B, T, T]``: the id of the token pair that keys the bound of query t on key u."""
    base = vocab + 1  # one more symbol: "no next token visible"
    if kind == "query-key":
        return tokens[:, :, None] * base + tokens[:, None, :]
    B, T = tokens.shape
    if kind == "key-previous":
        before = torch.cat([tokens.new_full((B, 1), vocab), tokens[:, :-1]], 1)
        return (tokens * base + before)[:, None, :].expand(B, T, T)
    if kind != "key-bigram":
        raise ConfigError(f"unknown attention-bound kind {kind!r} (choose from {', '.join(KINDS)})")
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
    floor: float  # cap: the weight any pair may reach; mask: the least a kept pair had
    kind: str = KINDS[0]
    mode: str = MODES[0]

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise ConfigError(f"the attention floor must be in [0, 1], got {self.floor}")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown attention-bound kind {self.kind!r}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown attention-bound mode {self.mode!r}")

    @property
    def n_layers(self) -> int:
        return self.peak.shape[0]

    def peaks(self, layer: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, H, T, T]`` trusted peak of query t on key u (0 where unseen), and
        ``[B, 1, T, T]`` whether trusted data showed the pair at all."""
        pair = pair_ids(tokens, self.vocab, self.kind).to(self.pairs.device).contiguous()
        at = torch.searchsorted(self.pairs, pair).clamp(max=max(len(self.pairs) - 1, 0))
        seen = self.pairs[at] == pair if len(self.pairs) else torch.zeros_like(pair, dtype=bool)
        peak = self.peak[layer][:, at].transpose(0, 1)  # [B, H, T, T]
        return torch.where(seen[:, None], peak, torch.zeros_like(peak)), seen[:, None]

    def limits(self, layer: int, tokens: Tensor) -> Tensor:
        """``[B, H, T, T]``: the most weight query t may put on key u (cap mode)."""
        return self.peaks(layer, tokens)[0].clamp(min=self.floor)

    def allowed(self, layer: int, tokens: Tensor) -> Tensor:
        """``[B, H, T, T]``: the pairs mask mode keeps (seen, with a peak of at least floor)."""
        peak, seen = self.peaks(layer, tokens)
        keep = seen & (peak >= self.floor)
        keep[..., 0] = True  # BOS: where a head with nothing left to read looks
        return keep

    def excess(self, layer: int, pattern: Tensor, tokens: Tensor) -> Tensor:
        """``[B, H, T, T]``: how far each weight of ``pattern`` goes beyond its limit (0 within)."""
        return (pattern - self.limits(layer, tokens).to(pattern)).clamp(min=0)

    def apply(self, layer: int, pattern: Tensor, tokens: Tensor) -> Tensor:
        """``pattern`` bounded: capped with the excess moved to BOS, or masked and renormalized."""
        if layer >= self.n_layers:
            return pattern
        if self.mode == "mask":
            kept = pattern * self.allowed(layer, tokens).to(pattern)
            return kept / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(kept.dtype).tiny)
        over = self.excess(layer, pattern, tokens)
        capped = pattern - over
        capped[..., 0] += over.sum(-1)
        return capped

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILENAME
        meta = [self.vocab, KINDS.index(self.kind), MODES.index(self.mode)]
        meta = torch.tensor(meta, dtype=torch.int64)
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
        meta = t["meta"].tolist() + [0] * (3 - len(t["meta"]))  # files before modes: cap
        if (
            t["peak"].shape[2] != len(t["pairs"])
            or not 0 <= meta[1] < len(KINDS)
            or not 0 <= meta[2] < len(MODES)
        ):
            raise ArtifactError(f"{path}: a damaged attention-bounds file")
        vocab, kind, mode = meta[0], KINDS[meta[1]], MODES[meta[2]]
        return cls(t["pairs"], t["peak"], vocab, float(t["floor"][0]), kind, mode)


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

    def bounds(self, floor: float, mode: str = MODES[0]) -> AttentionBounds:
        if self.peak is None:
            raise ConfigError("no trusted positions to measure attention on")
        return AttentionBounds(self.pairs, self.peak.float(), self.vocab, floor, self.kind, mode)


@torch.no_grad()
def attention_peaks(
    acg: Any,
    batches: Iterable[Tensor],
    floor: float,
    pad_token_id: int | None = 0,
    kind: str = KINDS[0],
    mode: str = MODES[0],
) -> AttentionBounds:
    """The bounds of :mod:`acgraph.graph.attention_bounds` from the largest weight each head
    gave each token pair of ``kind`` on ``batches`` (non-pad query positions)."""
    peaks = PeakAttention(acg.w.cfg.d_vocab, kind)
    for tokens in batches:
        trace = acg.run(tokens)
        valid = valid_positions(trace.tokens, pad_token_id, bos=True)
        peaks.add(trace.pattern, trace.tokens, valid)
    return peaks.bounds(floor, mode)
