"""Feature interventions: ablate, clamp or scale transcoder features at chosen positions, and
see the logits (or generated text) change.

An intervention changes a feature's activation from ``a`` to ``a'`` at layer L and adds
``(a' - a) · W_dec[f]`` to ``blocks.L.hook_mlp_out`` (the rest of the MLP output, error
included, is untouched). Two ways for the change to travel:
- **propagated** (default): through the real model; later MLPs, attention patterns and norm
  scales respond (so later features may change too);
- **constrained** to ``constrained_layers``: within those layers attention patterns, norm scales
  and the MLP outputs' non-skip parts are frozen at their clean values (the local replacement
  model of the attribution graph), so inside the range the change acts only through the
  graph's linear edges; layers outside the range run freely (with every layer constrained the
  final norm's scale is frozen too, and the logit change equals the graph's edges exactly).
``freeze_attention=True`` additionally freezes every layer's attention pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.errors import ConfigError

from .build import tokenize
from .frozen import capture, tc_input_name
from .transcoders import TranscoderSet, load_transcoders


@dataclass(frozen=True)
class Intervention:
    """Set (``mode="set"``, ablation is ``value=0``) or scale (``mode="scale"``) feature
    ``feature`` of ``layer`` at ``positions`` (None: every position, generated ones too)."""

    layer: int
    feature: int
    value: float = 0.0
    mode: str = "set"
    positions: tuple[int, ...] | None = None


def ablate(layer: int, feature: int, positions: Sequence[int] | None = None) -> Intervention:
    return Intervention(layer, feature, 0.0, "set", None if positions is None else tuple(positions))


@dataclass
class InterventionResult:
    tokens: Tensor
    clean_logits: Tensor  # [n, vocab]
    logits: Tensor  # [n, vocab]

    def top_changes(self, k: int = 10, position: int = -1) -> list[tuple[int, float, float, float]]:
        """(token id, clean prob, new prob, logit change) of the k largest probability changes."""
        p0 = torch.softmax(self.clean_logits[position].double(), -1)
        p1 = torch.softmax(self.logits[position].double(), -1)
        idx = (p1 - p0).abs().topk(min(k, p0.shape[0])).indices
        dl = self.logits[position] - self.clean_logits[position]
        return [(int(i), float(p0[i]), float(p1[i]), float(dl[i])) for i in idx]


def _check(model, ts: TranscoderSet, interventions: Sequence[Intervention], n: int | None) -> None:
    if not interventions:
        raise ConfigError("no interventions given")
    for iv in interventions:
        if not 0 <= iv.layer < ts.n_layers:
            raise ConfigError(f"intervention layer {iv.layer} outside 0..{ts.n_layers - 1}")
        if not 0 <= iv.feature < ts[iv.layer].d_sae:
            raise ConfigError(
                f"layer {iv.layer} has features 0..{ts[iv.layer].d_sae - 1}, not {iv.feature}"
            )
        if iv.mode not in ("set", "scale"):
            raise ConfigError(f"intervention mode must be 'set' or 'scale', not {iv.mode!r}")
        if n is not None and iv.positions is not None and any(not 0 <= p < n for p in iv.positions):
            raise ConfigError(f"intervention positions {iv.positions} outside 0..{n - 1}")


def intervention_hooks(
    model, ts: TranscoderSet, interventions: Sequence[Intervention]
) -> list[tuple[str, Callable]]:
    """Hooks adding each intervention's decoder delta to its layer's MLP output."""
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)
    x_in: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable]] = []
    for layer, ivs in by_layer.items():

        def grab(t: Tensor, hook, layer=layer) -> Tensor:
            x_in[layer] = t
            return t

        def edit(t: Tensor, hook, layer=layer, ivs=ivs) -> Tensor:
            d = ts[layer]
            acts = d.encode(x_in[layer])  # [b, n, d_sae]
            delta = torch.zeros_like(t)
            for iv in ivs:
                a = acts[..., iv.feature]
                new = torch.full_like(a, iv.value) if iv.mode == "set" else a * iv.value
                change = new - a
                if iv.positions is not None:
                    mask = torch.zeros_like(change)
                    mask[:, list(iv.positions)] = 1
                    change = change * mask
                delta = delta + change[..., None] * d.W_dec[iv.feature]
            return t + delta

        hooks.append((tc_input_name(ts, layer), grab))
        hooks.append((f"blocks.{layer}.hook_mlp_out", edit))
    return hooks


@torch.no_grad()
def intervene(
    model,
    transcoders,
    prompt: str | list[int] | Tensor,
    interventions: Sequence[Intervention],
    *,
    constrained_layers: range | None = None,
    freeze_attention: bool = False,
) -> InterventionResult:
    """Logits of ``prompt`` with and without ``interventions`` (see the module doc)."""
    ts = load_transcoders(transcoders, model)
    tokens = tokenize(model, prompt)
    n = int(tokens.shape[0])
    _check(model, ts, interventions, n)
    cap = capture(model, ts, tokens)
    hooks = []
    frozen_layers = set(constrained_layers or ())
    if constrained_layers is not None and not frozen_layers <= set(range(ts.n_layers)):
        raise ConfigError(f"constrained layers {constrained_layers} outside the model's layers")
    for i in range(ts.n_layers):
        if i in frozen_layers or freeze_attention:
            hooks.append((f"blocks.{i}.attn.hook_pattern", _fixed(cap.patterns[i][None])))
        if i in frozen_layers:
            hooks.append((f"blocks.{i}.ln1.hook_scale", _fixed(cap.ln1_scale[i][None, :, None])))
            hooks.append((f"blocks.{i}.ln2.hook_scale", _fixed(cap.ln2_scale[i][None, :, None])))
            hooks += _frozen_mlp(ts, cap, i)
    if frozen_layers >= set(range(ts.n_layers)):  # all layers: the final norm scale too
        hooks.append(("ln_final.hook_scale", _fixed(cap.lnf_scale[None, :, None])))
    hooks += intervention_hooks(model, ts, interventions)
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens[None])[0]
    return InterventionResult(tokens.cpu(), cap.logits.cpu(), logits.float().cpu())


def _fixed(value: Tensor) -> Callable:
    return lambda t, hook: value.to(t.dtype).expand_as(t)


def _frozen_mlp(ts: TranscoderSet, cap, layer: int) -> list[tuple[str, Callable]]:
    x_in: dict[str, Tensor] = {}
    skip_w = ts.skip(layer)

    def grab(t: Tensor, hook) -> Tensor:
        x_in["x"] = t
        return t

    def out(t: Tensor, hook) -> Tensor:
        if skip_w is None:
            return cap.mlp_out[layer][None].expand_as(t).clone()
        frozen_part = cap.mlp_out[layer] - cap.tc_in[layer] @ skip_w.T
        return x_in["x"] @ skip_w.T + frozen_part[None]

    return [(tc_input_name(ts, layer), grab), (f"blocks.{layer}.hook_mlp_out", out)]


@torch.no_grad()
def generate(
    model,
    transcoders,
    prompt: str | list[int] | Tensor,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    stop_token: int | None = None,
) -> Tensor:
    """Token ids of ``prompt`` continued under ``interventions`` (propagated through the real
    model; positions=None interventions apply to generated tokens too). Greedy when
    ``temperature`` is 0."""
    ts = load_transcoders(transcoders, model)
    tokens = tokenize(model, prompt)
    if interventions:
        _check(model, ts, interventions, None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hooks = intervention_hooks(model, ts, interventions) if interventions else []
    limit = model.cfg.n_ctx if model.cfg.positional_embedding_type == "standard" else None
    with model.hooks(fwd_hooks=hooks):
        for _ in range(max_new_tokens):
            if limit is not None and tokens.shape[0] >= limit:
                break
            logits = model(tokens[None])[0, -1].float()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, -1).cpu()
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            tokens = torch.cat([tokens, torch.tensor([nxt], device=tokens.device)])
            if stop_token is not None and nxt == stop_token:
                break
    return tokens.cpu()
