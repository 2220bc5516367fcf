"""What a hypothesis is: a Python function bound to one node of the graph.

    from acgraph.hypotheses import feature, head

    @feature(1, 37)                       # layer 1, feature 37
    def open_bracket(ctx):
        return 2.5 * ctx.is_token("(", "[", "{", "<")

    @head(0, 2)                           # layer 0, head 2's attention pattern
    def previous_token(ctx):
        return ctx.offset(1)

A target is a feature (``[B, T]`` values), a head's attention pattern (``[B, T, T]`` rows) or a
whole component's output (``mlp`` or ``attn`` of a layer, ``[B, T, d_model]``). The function gets a
:class:`Context`: the tokens and, read-only, the values of nodes upstream of its target (in the
run it is swapped into, so hypotheses compose).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ConfigError

KINDS = ("feature", "pattern", "mlp", "attn")


@dataclass(frozen=True, order=True)
class Target:
    kind: str  # one of KINDS
    layer: int
    index: int = -1  # feature id or head; -1 for a component

    def __str__(self) -> str:
        if self.kind == "feature":
            return f"L{self.layer}/{self.index}"
        if self.kind == "pattern":
            return f"L{self.layer}.H{self.index}"
        return f"L{self.layer}.{self.kind}"

    def reads(self) -> tuple[int, int]:
        """(feature layers, pattern layers) a hypothesis of this target may read: those below."""
        if self.kind in ("feature", "mlp"):
            return self.layer, self.layer + 1  # this layer's patterns come before its features
        return self.layer, self.layer


@dataclass
class Hypothesis:
    target: Target
    fn: Callable[[Context], Tensor]
    name: str
    family: str = "hand-written"
    source: str = ""  # file it came from
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, ctx: Context) -> Tensor:
        return self.fn(ctx)


# Hypotheses register themselves here while a file is being loaded (see loader.py).
_REGISTRY: ContextVar[list[Hypothesis] | None] = ContextVar("acgraph_hypotheses", default=None)


def _register(h: Hypothesis) -> Hypothesis:
    found = _REGISTRY.get()
    if found is not None:
        found.append(h)
    return h


def _decorator(target: Target, name: str | None, family: str, meta: dict[str, Any]):
    if target.layer < 0 or (target.kind != "mlp" and target.kind != "attn" and target.index < 0):
        raise ConfigError(f"invalid hypothesis target {target}")

    def wrap(fn: Callable[[Context], Tensor]) -> Hypothesis:
        return _register(Hypothesis(target, fn, name or fn.__name__, family, meta=meta))

    return wrap


def feature(layer: int, id: int, *, name: str | None = None, family: str = "hand-written", **meta):
    """Decorate ``fn(ctx) -> [B, T]``: the values of feature ``id`` of layer ``layer``."""
    return _decorator(Target("feature", int(layer), int(id)), name, family, meta)


def head(layer: int, head: int, *, name: str | None = None, family: str = "hand-written", **meta):
    """Decorate ``fn(ctx) -> [B, T, T]``: the attention pattern of one head (rows sum to 1)."""
    return _decorator(Target("pattern", int(layer), int(head)), name, family, meta)


def component(kind: str, layer: int, *, name: str | None = None, family: str = "hand-written"):
    """Decorate ``fn(ctx) -> [B, T, d_model]``: the whole output of a layer's ``mlp`` or
    ``attn``."""
    if kind not in ("mlp", "attn"):
        raise ConfigError(f"component kind must be 'mlp' or 'attn', got {kind!r}")
    return _decorator(Target(kind, int(layer)), name, family, {})


def zero(layer: int, ids: Iterable[int], *, family: str = "dead") -> list[Hypothesis]:
    """Features that never fire: each one's hypothesis is "always 0"."""
    return [
        _register(Hypothesis(Target("feature", layer, int(i)), _zeros, f"dead_{layer}_{i}", family))
        for i in ids
    ]


def _zeros(ctx: Context) -> Tensor:
    return ctx.zeros()


class Context:
    """What a hypothesis sees: tokens, positions, and upstream node values (copies).

    ``view`` has ``tokens``, ``acts`` (list of ``[B, T, F]`` per layer) and ``pattern`` (list of
    ``[B, H, T, T]``); only layers below the target's limits may be read.
    """

    def __init__(self, view: Any, vocab: dict[str, int], target: Target, d_model: int = 0):
        self._view = view
        self._vocab = vocab
        self.target = target
        self.tokens: Tensor = view.tokens
        B, T = self.tokens.shape
        self.positions = torch.arange(T, device=self.tokens.device).expand(B, T)
        self.d_model = d_model
        self._dtype = torch.float32

    # ---------------------------------------------------------------- tokens

    def tok(self, token: str) -> int:
        """Id of a token string (error if the vocabulary has no such token)."""
        if token not in self._vocab:
            raise ConfigError(f"hypothesis {self.target}: unknown token {token!r}")
        return self._vocab[token]

    def is_token(self, *tokens: str, shift: int = 0) -> Tensor:
        """1.0 where the token ``shift`` positions back is one of ``tokens`` (0 before the
        start)."""
        ids = torch.tensor([self.tok(t) for t in tokens], device=self.tokens.device)
        return torch.isin(self.shifted(shift), ids).to(self._dtype)

    def shifted(self, shift: int) -> Tensor:
        """Token ids ``shift`` positions back (-1 before the start of the sequence)."""
        if shift == 0:
            return self.tokens
        out = torch.full_like(self.tokens, -1)
        out[:, shift:] = self.tokens[:, :-shift]
        return out

    def token_values(self, table: dict[str, float], shift: int = 0) -> Tensor:
        """``table[token]`` at every position (0 for tokens not in the table)."""
        lut = torch.zeros(len(self._vocab) + 1, dtype=self._dtype, device=self.tokens.device)
        for t, v in table.items():
            lut[self.tok(t)] = v
        return lut[self.shifted(shift)]  # -1 reads the spare last slot: 0

    def ngram_values(self, table: dict[tuple[str, ...], float]) -> Tensor:
        """``table[(..., previous token, token)]`` at every position (0 elsewhere)."""
        out = self.zeros()
        for gram, v in table.items():
            hit = torch.ones_like(out, dtype=torch.bool)
            for back, t in enumerate(reversed(gram)):
                hit &= self.shifted(back) == self.tok(t)
            out = torch.where(hit, torch.as_tensor(v, dtype=self._dtype), out)
        return out

    def position_values(self, table: dict[int, float]) -> Tensor:
        T = self.tokens.shape[1]
        lut = torch.zeros(T, dtype=self._dtype, device=self.tokens.device)
        for p, v in table.items():
            if 0 <= int(p) < T:
                lut[int(p)] = v
        return lut[self.positions]

    def zeros(self) -> Tensor:
        return torch.zeros(self.tokens.shape, dtype=self._dtype, device=self.tokens.device)

    # ---------------------------------------------------------------- upstream nodes

    def feature(self, layer: int, id: int) -> Tensor:
        """Values ``[B, T]`` of an upstream feature."""
        if not 0 <= layer < self.target.reads()[0] or layer >= len(self._view.acts):
            raise ConfigError(
                f"hypothesis {self.target} reads feature L{layer}/{id}, which is not upstream of it"
            )
        return self._view.acts[layer][..., id].detach().clone()

    def pattern(self, layer: int, head: int) -> Tensor:
        """Attention pattern ``[B, T, T]`` of an upstream head."""
        if not 0 <= layer < self.target.reads()[1] or layer >= len(self._view.pattern):
            raise ConfigError(
                f"hypothesis {self.target} reads head L{layer}.H{head}, which is not upstream of it"
            )
        return self._view.pattern[layer][:, head].detach().clone()

    def attend(self, layer: int, head: int, values: Tensor) -> Tensor:
        """``values`` (``[B, T]``) as an upstream head moves them: the pattern-weighted average
        over the positions each query attends to."""
        return (self.pattern(layer, head) @ values[..., None])[..., 0]

    # ---------------------------------------------------------------- patterns

    def _rows(self, mask: Tensor) -> Tensor:
        """Uniform attention over ``mask`` (``[B, T, T]``, causal), BOS where a row is empty."""
        T = mask.shape[-1]
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
        empty = ~mask.any(-1)
        mask[..., 0] |= empty
        m = mask.to(self._dtype)
        return m / m.sum(-1, keepdim=True)

    def offset(self, d: int) -> Tensor:
        """Attend to the token ``d`` positions back (BOS when there is none)."""
        B, T = self.tokens.shape
        q = torch.arange(T, device=self.tokens.device)
        mask = (q[:, None] - q[None, :]) == d
        return self._rows(mask.expand(B, T, T).clone())

    def previous_token(self) -> Tensor:
        return self.offset(1)

    def bos(self) -> Tensor:
        B, T = self.tokens.shape
        mask = torch.zeros(B, T, T, dtype=torch.bool, device=self.tokens.device)
        mask[..., 0] = True
        return self._rows(mask)

    def same_token(self) -> Tensor:
        """Attend to earlier occurrences of the current token."""
        t = self.tokens
        mask = t[:, :, None] == t[:, None, :]
        return self._rows(mask & ~torch.eye(t.shape[1], dtype=torch.bool, device=t.device))

    def induction(self) -> Tensor:
        """Attend to the tokens that followed earlier occurrences of the current token."""
        t = self.tokens
        prev = self.shifted(1)
        mask = t[:, :, None] == prev[:, None, :]  # key s follows an earlier copy of query's token
        return self._rows(mask)

    def softmax_pattern(self, keys: dict[str, float], offsets: dict[int, float]) -> Tensor:
        """Attention by key token and distance: softmax over keys ``s <= t`` of
        ``keys[token at s] + offsets[t - s]`` (a missing token scores 0; distances past the
        largest offset listed use that offset's score)."""
        lut = torch.zeros(len(self._vocab) + 1, dtype=self._dtype, device=self.tokens.device)
        for t, v in keys.items():
            lut[self.tok(t)] = v
        T = self.tokens.shape[1]
        far = max(offsets) if offsets else 0
        by_dist = torch.zeros(far + 1, dtype=self._dtype, device=self.tokens.device)
        for d, v in offsets.items():
            by_dist[int(d)] = v
        q = torch.arange(T, device=self.tokens.device)
        dist = (q[:, None] - q[None, :]).clamp(0, far)
        scores = lut[self.tokens][:, None, :] + by_dist[dist][None]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.tokens.device).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)

    def mix(self, *parts: tuple[float, Tensor]) -> Tensor:
        """A weighted sum of patterns (weights are normalised to sum to one)."""
        total = sum(w for w, _ in parts)
        return sum(w * p for w, p in parts) / total

    # ---------------------------------------------------------------- activations

    @staticmethod
    def relu(x: Tensor) -> Tensor:
        return torch.relu(x)

    @staticmethod
    def jump(pre: Tensor, threshold: float) -> Tensor:
        """JumpReLU: ``pre`` where it exceeds ``threshold``, else 0."""
        return torch.where(pre > threshold, pre, torch.zeros_like(pre))


def check_output(h: Hypothesis, value: Any, shape: tuple[int, ...]) -> Tensor:
    """The hypothesis's output as a float tensor of ``shape``, or a one-line error."""
    if not isinstance(value, Tensor):
        if isinstance(value, int | float):
            return torch.full(shape, float(value))
        raise ConfigError(
            f"hypothesis {h.name} ({h.target}) returned {type(value).__name__}, not a tensor"
        )
    try:
        return value.to(torch.float32).expand(shape)
    except RuntimeError:
        raise ConfigError(
            f"hypothesis {h.name} ({h.target}) returned shape {tuple(value.shape)}, "
            f"expected {shape}"
        ) from None
