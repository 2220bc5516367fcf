"""Keep only the features a task needs, then compile (`acg distill`).

A task is a corpus (for the organism: one domain's text). Each feature is scored by its
attribution to the task's next tokens: ``|a_i · ∂ log p(next) / ∂a_i|`` summed over the task's
positions, through the model with every MLP replaced by its transcoder (attention and norms
live). Under a budget (a fraction of the features) the best-scoring features of each layer
are kept; the rest are removed as in a cleaned graph, and the result compiles like any other
level-1 ACG. Removing features shifts what the survivors should compute, so the kept features
can then be refined end to end on the task (KL to the original model on the task's text, the
loop of `acg finetune`). Heads and edges are not selected yet (only features).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.dictionaries.capped import CappedActivation
from acgraph.errors import ConfigError

from .compile import derive_transcoder


@dataclass
class TaskAttribution:
    features: dict[int, Tensor]  # per layer [d_sae]: summed |activation x gradient|
    heads: Tensor  # [n_layers, n_heads]: summed |z . gradient| of each head's output
    mean_z: Tensor  # [n_layers, n_heads, d_head]: each head's mean z on the task


def task_attribution(
    model: Any, transcoders: dict[int, Any], batches: Sequence[Tensor]
) -> TaskAttribution:
    """Attribution of the log-probability of every next token of ``batches`` (BOS and pad
    positions excluded) to each feature and each head, through the model with every MLP
    replaced by its transcoder."""
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    cfg = model.cfg
    feats = {i: torch.zeros(tc.d_sae) for i, tc in transcoders.items()}
    heads = torch.zeros(cfg.n_layers, cfg.n_heads)
    z_sum = torch.zeros(cfg.n_layers, cfg.n_heads, cfg.d_head)
    n = 0
    model.requires_grad_(False)
    for tokens in batches:
        keep = valid_positions(tokens, pad)
        acts: dict[int, Tensor] = {}
        zs: dict[int, tuple[Tensor, Tensor]] = {}
        hooks = _attribution_hooks(transcoders, keep, acts) + _head_hooks(cfg.n_layers, zs)
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        logp[keep[:, 1:]].sum().backward()
        for layer, a in acts.items():
            feats[layer] += (a * a.grad).abs().detach().sum((0, 1))
        w = keep[..., None, None].to(z_sum)
        for layer, (z, probe) in zs.items():
            heads[layer] += ((z * probe.grad).sum(-1).abs() * w[..., 0]).sum((0, 1))
            z_sum[layer] += (z * w).sum((0, 1))
        n += int(keep.sum())
    return TaskAttribution(feats, heads, z_sum / max(n, 1))


def feature_attribution(
    model: Any, transcoders: dict[int, Any], batches: Sequence[Tensor]
) -> dict[int, Tensor]:
    """Per layer ``[d_sae]``: the features' part of :func:`task_attribution`."""
    return task_attribution(model, transcoders, batches).features


def _attribution_hooks(
    transcoders: dict[int, Any], keep: Tensor, acts: dict[int, Tensor]
) -> list[tuple[str, Any]]:
    """Splice hooks whose feature activations are leaves (their gradients are the scores)."""
    inputs: dict[int, Tensor] = {}
    hooks: list[tuple[str, Any]] = []
    for layer, tc in transcoders.items():

        def store(value: Tensor, hook: Any, layer: int = layer) -> None:
            inputs[layer] = value

        def replace(value: Tensor, hook: Any, layer: int = layer, tc: Any = tc) -> Tensor:
            x = inputs.pop(layer)
            a = tc.activation(tc.pre_acts(x).detach()).detach().requires_grad_(True)
            acts[layer] = a
            return torch.where(keep[..., None], tc.decode(a, x), value)

        hooks += [(f"blocks.{layer}.ln2.hook_normalized", store)]
        hooks += [(f"blocks.{layer}.hook_mlp_out", replace)]
    return hooks


def _head_hooks(n_layers: int, zs: dict[int, tuple[Tensor, Tensor]]) -> list[tuple[str, Any]]:
    """Add a zero leaf to every head output ``z``: its gradient is ``∂ log p / ∂z`` without
    cutting the paths through ``z`` to earlier nodes."""

    def probe(value: Tensor, hook: Any, layer: int) -> Tensor:
        leaf = torch.zeros_like(value, requires_grad=True)
        zs[layer] = (value.detach(), leaf)
        return value + leaf

    return [
        (f"blocks.{layer}.attn.hook_z", lambda v, hook, layer=layer: probe(v, hook, layer))
        for layer in range(n_layers)
    ]


def select_features(scores: dict[int, Tensor], budget: float) -> dict[int, Tensor]:
    """Keep masks: the top ``budget`` fraction of each layer's features by score."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"budget must be in (0, 1], got {budget}")
    keep = {}
    for layer, s in scores.items():
        n = max(1, round(budget * len(s)))
        mask = torch.zeros(len(s), dtype=torch.bool)
        mask[s.topk(n).indices] = True
        keep[layer] = mask
    return keep


def select_heads(scores: Tensor, budget: float) -> Tensor:
    """Keep mask ``[n_layers, n_heads]``: the top ``budget`` fraction of all heads by score."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"head budget must be in (0, 1], got {budget}")
    flat = scores.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(max(1, round(budget * len(flat)))).indices] = True
    return keep.reshape(scores.shape)


@torch.no_grad()
def without_heads(model: Any, keep: Tensor, mean_z: Tensor) -> Any:
    """A copy of ``model`` in which every head outside ``keep`` is mean-ablated: its output
    weights are zero and its mean output on the task is folded into the layer's ``b_O``.
    Query weights go too, and key/value weights where heads do not share them."""
    import copy

    if bool(keep.all()):
        return model
    out = copy.deepcopy(model)
    for layer, head in (~keep).nonzero().tolist():
        attn = out.blocks[layer].attn
        attn.b_O += mean_z[layer, head] @ attn.W_O[head]
        names = ["W_O", "W_Q", "b_Q"]
        if not hasattr(attn, "_W_K"):  # grouped-query attention shares K/V between heads
            names += ["W_K", "b_K", "W_V", "b_V"]
        for name in names:
            getattr(attn, name)[head] = 0
    return out


@dataclass
class Distilled:
    acg: Any  # the runnable ACG of the kept features
    transcoders: dict[int, Any]  # the kept (and refined) transcoders
    keep: dict[int, Tensor]  # per layer, which of the original features were kept
    heads: Tensor  # [n_layers, n_heads]: which heads were kept (the rest mean-ablated)
    refine_kl: list[float] = field(default_factory=list)  # KL per refinement step


def distill(
    model: Any,
    transcoders: dict[int, Any],
    task: Sequence[Tensor],
    budget: float,
    *,
    head_budget: float = 1.0,
    refine_steps: int = 0,
    refine_lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> Distilled:
    """The features ``task`` needs most under ``budget`` (a fraction of each layer's) and the
    heads under ``head_budget`` (a fraction of all heads; the rest are mean-ablated in a copy
    of the model, which the returned ACG runs on). With ``refine_steps`` the kept features
    are then trained on ``task`` to match the original model; ``model`` and ``transcoders``
    are left untouched."""
    from acgraph.dictionaries.finetune import finetune_end_to_end
    from acgraph.graph.forward import ACGModel
    from acgraph.graph.weights import ModelWeights

    if refine_steps < 0:
        raise ConfigError(f"refine_steps must be >= 0, got {refine_steps}")
    scores = task_attribution(model, transcoders, task)
    keep = select_features(scores.features, budget)
    heads = select_heads(scores.heads, head_budget)
    pruned = without_heads(model, heads, scores.mean_z)
    kept = {i: derive_transcoder(tc, keep=keep[i]) for i, tc in transcoders.items()}
    for i, tc in kept.items():  # an activation cap travels with the features it caps
        cap = getattr(transcoders[i].activation, "ceiling", None)
        if cap is not None:
            tc.activation = CappedActivation(tc.activation, cap[keep[i]])
    losses = []
    if refine_steps:
        losses = finetune_end_to_end(
            pruned, kept, task, steps=refine_steps, lr=refine_lr, seed=seed, reference=model,
            progress=progress,
        )  # fmt: skip
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    return Distilled(ACGModel(ModelWeights(pruned, kept, bos)), kept, keep, heads, losses)
