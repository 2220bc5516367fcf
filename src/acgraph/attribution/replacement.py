"""The local replacement model as TransformerLens hooks on the real model.

Two ways to freeze, for two uses:
- ``"detach"`` (what circuit-tracer does, for autograd): the forward values are the real ones;
  attention patterns and norm scales are detached and each MLP output becomes
  ``skip(x) + (mlp_out - skip(x)).detach()``, so gradients see a linear model.
- ``"replay"`` (for interventions and checks): patterns, scales and the non-skip part of each
  MLP output are *replaced* by the values cached from the clean run, so the forward pass itself
  is the linear local replacement model, and perturbations propagate through it exactly.

``injections`` add vectors at hooks: ``{hook_name: [(position, vector), ...]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .frozen import Capture, tc_input_name
from .transcoders import TranscoderSet

Injections = dict[str, list[tuple[int, Tensor]]]


def _skip(ts: TranscoderSet, layer: int, x: Tensor) -> Tensor:
    w = ts.skip(layer)
    return torch.zeros_like(x) if w is None else x @ w.T


def replacement_hooks(
    model,
    ts: TranscoderSet,
    cap: Capture | None,
    mode: str = "replay",
    injections: Injections | None = None,
    record: dict[str, Tensor] | None = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks implementing the frozen replacement model (see the module doc).

    ``record`` (when given) receives each layer's transcoder input under the name
    ``blocks.L.<input hook>`` and ``ln_final.hook_normalized``.
    """
    if mode not in ("replay", "detach"):
        raise ValueError(mode)
    if mode == "replay" and cap is None:
        raise ValueError("replay needs a Capture")
    L = model.cfg.n_layers
    hooks: list[tuple[str, Callable]] = []
    x_in: dict[int, Tensor] = {}
    injections = injections or {}

    def add_injections(name: str, t: Tensor) -> Tensor:
        for pos, vec in injections.get(name, ()):
            t = t.clone()
            t[:, pos] = t[:, pos] + vec.to(t.dtype)
        return t

    def freeze(value_of: Callable[[], Tensor]) -> Callable:
        def hook(t: Tensor, hook) -> Tensor:
            if mode == "detach":
                return t.detach()
            return value_of().to(t.dtype).expand_as(t)

        return hook

    for i in range(L):
        hooks.append((f"blocks.{i}.attn.hook_pattern", freeze(lambda i=i: cap.patterns[i][None])))
        hooks.append(
            (f"blocks.{i}.ln1.hook_scale", freeze(lambda i=i: cap.ln1_scale[i][None, :, None]))
        )
        hooks.append(
            (f"blocks.{i}.ln2.hook_scale", freeze(lambda i=i: cap.ln2_scale[i][None, :, None]))
        )

        def grab(t: Tensor, hook, i=i) -> Tensor:
            x_in[i] = t
            if record is not None:
                record[hook.name] = t
            return t

        hooks.append((tc_input_name(ts, i), grab))

        def mlp_out(t: Tensor, hook, i=i) -> Tensor:
            skip = _skip(ts, i, x_in[i])
            if mode == "detach":
                out = skip + (t - skip).detach()
            else:
                frozen = cap.mlp_out[i] - _skip(ts, i, cap.tc_in[i])
                out = skip + frozen[None].to(t.dtype)
            return add_injections(hook.name, out)

        hooks.append((f"blocks.{i}.hook_mlp_out", mlp_out))
    hooks.append(("ln_final.hook_scale", freeze(lambda: cap.lnf_scale[None, :, None])))

    def final(t: Tensor, hook) -> Tensor:
        if record is not None:
            record[hook.name] = t
        return t

    hooks.append(("ln_final.hook_normalized", final))
    hooks.append(("hook_embed", lambda t, hook: add_injections(hook.name, t)))
    return hooks


@contextmanager
def frozen(model, ts: TranscoderSet, cap: Capture | None, mode: str = "replay", **kw) -> Iterator:
    with model.hooks(fwd_hooks=replacement_hooks(model, ts, cap, mode, **kw)):
        yield
