"""Swap hypotheses in: inside the runnable ACG, and inside the real model through hooks.

- ACG: a :class:`~acgraph.graph.forward.Replacement` substitutes each target's values as the
  graph computes them; everything downstream reads the substituted values.
- Real model: hooks on the attention pattern, the MLP input and the MLP/attention outputs. A
  swapped feature changes the MLP output by ``(hypothesis - transcoder value) * W_dec[id]``;
  when every feature of a layer is swapped, the MLP output becomes the transcoder decoder of
  the hypothesis values (the transcoder's error is dropped: it is not understood either).

Both keep a *view* (tokens, per-layer feature values and patterns) that hypotheses read
through a :class:`Context`, so upstream hypotheses feed downstream ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ConfigError
from acgraph.graph.forward import ACGModel, Replacement, Trace

from .core import Context, Hypothesis, Target, check_output


@dataclass
class View:
    """Node values of one run of the real model, as transcoders read them."""

    tokens: Tensor
    acts: list[Tensor] = field(default_factory=list)  # [B, T, F] per layer
    pattern: list[Tensor] = field(default_factory=list)  # [B, H, T, T] per layer
    mlp_in: list[Tensor] = field(default_factory=list)
    mlp_out: list[Tensor] = field(default_factory=list)
    attn_out: list[Tensor] = field(default_factory=list)
    logits: Tensor | None = None


class Swapped:
    """A set of hypotheses grouped by where they act, and how to evaluate one on a view."""

    def __init__(self, hyps: dict[Target, Hypothesis], vocab: dict[str, int], d_model: int):
        self.vocab = vocab
        self.d_model = d_model
        self.features: dict[int, list[Hypothesis]] = {}
        self.patterns: dict[int, list[Hypothesis]] = {}
        self.components: dict[tuple[str, int], Hypothesis] = {}
        for t, h in sorted(hyps.items()):
            if t.kind == "feature":
                self.features.setdefault(t.layer, []).append(h)
            elif t.kind == "pattern":
                self.patterns.setdefault(t.layer, []).append(h)
            else:
                self.components[(t.kind, t.layer)] = h

    def value(self, h: Hypothesis, view: Any) -> Tensor:
        """``h`` on ``view`` (upstream values only), checked and with the BOS position fixed."""
        B, T = view.tokens.shape
        ctx = Context(view, self.vocab, h.target, self.d_model)
        kind = h.target.kind
        shape = {"feature": (B, T), "pattern": (B, T, T)}.get(kind, (B, T, self.d_model))
        try:
            raw = h(ctx)
        except ConfigError:
            raise
        except Exception as err:  # user code: one line, with where it came from
            raise ConfigError(
                f"hypothesis {h.name} ({h.target}, {h.source or 'in memory'}) failed: "
                f"{type(err).__name__}: {err}"
            ) from None
        out = check_output(h, raw, shape).to(view.tokens.device).clone()
        if kind == "feature":
            out[:, 0] = 0
        elif kind == "pattern":
            out = out.tril()
            out[:, 0] = 0
            out[:, 0, 0] = 1
        return out

    def patterns_of(self, layer: int, pattern: Tensor, view: Any) -> Tensor:
        hs = self.patterns.get(layer)
        if not hs:
            return pattern
        pattern = pattern.clone()
        for h in hs:
            pattern[:, h.target.index] = self.value(h, view).to(pattern.dtype)
        return pattern

    def acts_of(self, layer: int, acts: Tensor, view: Any) -> Tensor:
        hs = self.features.get(layer)
        if not hs:
            return acts
        acts = acts.clone()
        for h in hs:
            acts[..., h.target.index] = self.value(h, view).to(acts.dtype)
        return acts

    def component(self, kind: str, layer: int, out: Tensor, view: Any) -> Tensor:
        h = self.components.get((kind, layer))
        return out if h is None else self.value(h, view).to(out.dtype)


class ACGSwap(Replacement):
    """Hypotheses substituted inside an :class:`ACGModel` run."""

    def __init__(self, swapped: Swapped):
        self.s = swapped

    def pattern(self, layer: int, pattern: Tensor, trace: Trace) -> Tensor:
        return self.s.patterns_of(layer, pattern, trace)

    def attn_out(self, layer: int, out: Tensor, trace: Trace) -> Tensor:
        return self.s.component("attn", layer, out, trace)

    def acts(self, layer: int, acts: Tensor, trace: Trace) -> Tensor:
        return self.s.acts_of(layer, acts, trace)

    def mlp_out(self, layer: int, out: Tensor, trace: Trace) -> Tensor:
        return self.s.component("mlp", layer, out, trace)


def run_acg(acg: ACGModel, tokens: Tensor, swapped: Swapped | None) -> Trace:
    return acg.run(tokens, replace=ACGSwap(swapped) if swapped else None)


@torch.no_grad()
def run_model(
    model: Any, transcoders: dict[int, Any], tokens: Tensor, swapped: Swapped | None = None
) -> View:
    """The real model with ``swapped`` hypotheses hooked in (none: a plain run that records
    every transcoder's feature values)."""
    view = View(tokens=tokens)
    orig: dict[int, Tensor] = {}
    n_layers = len(transcoders)

    def on_pattern(value: Tensor, hook: Any) -> Tensor:
        layer = len(view.pattern)
        value = swapped.patterns_of(layer, value, view) if swapped else value
        view.pattern.append(value)
        return value

    def on_mlp_in(value: Tensor, hook: Any) -> None:
        layer = len(view.acts)
        acts = transcoders[layer].encode(value)
        acts[:, 0] = 0
        orig[layer] = acts
        view.mlp_in.append(value)
        view.acts.append(swapped.acts_of(layer, acts, view) if swapped else acts)

    def on_mlp_out(value: Tensor, hook: Any) -> Tensor:
        layer = len(view.mlp_out)
        if swapped is not None and layer < n_layers:
            hs = swapped.features.get(layer, [])
            tc = transcoders[layer]
            if len(hs) == tc.d_sae:  # the whole layer is hypotheses: no transcoder error
                value = tc.decode(view.acts[layer], view.mlp_in[layer])
            elif hs:
                value = value + (view.acts[layer] - orig[layer]) @ tc.W_dec
            value = swapped.component("mlp", layer, value, view)
        view.mlp_out.append(value)
        return value

    def on_attn_out(value: Tensor, hook: Any) -> Tensor:
        layer = len(view.attn_out)
        if swapped is not None:
            value = swapped.component("attn", layer, value, view)
        view.attn_out.append(value)
        return value

    hooks: list[tuple[str, Callable]] = []
    for layer in range(n_layers):
        hooks += [
            (f"blocks.{layer}.attn.hook_pattern", on_pattern),
            (f"blocks.{layer}.hook_attn_out", on_attn_out),
            (f"blocks.{layer}.ln2.hook_normalized", on_mlp_in),
            (f"blocks.{layer}.hook_mlp_out", on_mlp_out),
        ]
    view.logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return view


def true_value(target: Target, view: View) -> Tensor:
    """The target's values in an unswapped run of the real model."""
    if target.kind == "feature":
        return view.acts[target.layer][..., target.index]
    if target.kind == "pattern":
        return view.pattern[target.layer][:, target.index]
    return (view.mlp_out if target.kind == "mlp" else view.attn_out)[target.layer]
