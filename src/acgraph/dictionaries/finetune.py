"""End-to-end fine-tuning of MLP transcoders (`acg finetune`).

Transcoders trained layer by layer each predict their own MLP well, but their errors compound:
a layer reads the residual that the transcoders below it wrote, which the per-layer objective
never sees. Here every MLP is replaced by its transcoder at once and the transcoders are
trained together to match the original model's next-token distribution,
KL(model ‖ spliced model), on a corpus (as end-to-end SAEs do for the residual stream). The
spliced model is exactly the level-1 ACG, so this raises the ceiling of every graph built
from the transcoders.

Checkpoints (``checkpoint``: a file path) hold the transcoders, the optimizer, the sampler and
the losses in one safetensors file written atomically; ``resume=True`` continues a run exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.errors import ArtifactError, ConfigError
from acgraph.io import atomic_save_tensors, load_tensors

from .metrics import splice_hooks
from .training import decayed_lr


def sampled_kl(model: Any, data: Tensor, rows: int, gen: torch.Generator, run: Any) -> Tensor:
    """KL(model ‖ replacement) over the ACG's positions of ``rows`` contexts drawn from
    ``data``; ``run(batch, mask)`` gives the replacement's logits (with autograd)."""
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    batch = data[torch.randint(len(data), (min(rows, len(data)),), generator=gen)]
    mask = valid_positions(batch, pad)
    with torch.no_grad():
        target = model(batch).log_softmax(-1)[mask]
    logp = run(batch, mask).log_softmax(-1)[mask]
    return (target.exp() * (target - logp)).sum(-1).mean()


def _params(transcoders: dict[int, Any]) -> dict[str, Tensor]:
    return {
        f"L{layer}.{name}": p
        for layer, tc in sorted(transcoders.items())
        for name, p in tc.named_parameters()
        if p.is_floating_point()
    }


@dataclass
class _Kept:
    """Validation history [(step, KL)] and the parameters at its lowest KL so far."""

    history: list[tuple[int, float]] = field(default_factory=list)
    params: dict[str, Tensor] = field(default_factory=dict)

    def record(self, step: int, kl: float, params: dict[str, Tensor]) -> None:
        if not self.history or kl < min(v for _, v in self.history):
            self.params = {k: p.detach().clone() for k, p in params.items()}
        self.history.append((step, kl))

    @property
    def best_step(self) -> int:
        return min(self.history, key=lambda sv: sv[1])[0]


def _save(path: Path, params, opt, gen, losses: list[float], kept: _Kept | None = None) -> None:
    tensors = {f"param.{k}": p.detach() for k, p in params.items()}
    if kept is not None and kept.params:
        tensors.update({f"kept.{k}": p for k, p in kept.params.items()})
        tensors["validation"] = torch.tensor(kept.history, dtype=torch.float64).reshape(-1, 2)
    for k, p in params.items():
        for name, value in opt.state.get(p, {}).items():
            tensors[f"adam.{name}.{k}"] = torch.as_tensor(value)
    tensors["sampler"] = gen.get_state()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    atomic_save_tensors(path, tensors)


def _restore(path: Path, params, opt, gen, kept: _Kept | None = None) -> list[float]:
    saved = load_tensors(path)
    if kept is not None and "validation" in saved:
        kept.history = [(int(s), float(v)) for s, v in saved["validation"].tolist()]
        kept.params = {k: saved[f"kept.{k}"] for k in params}
    missing = [k for k in params if f"param.{k}" not in saved]
    if missing:
        raise ArtifactError(f"{path} is not a checkpoint of this run (no {missing[0]})")
    with torch.no_grad():
        for k, p in params.items():
            if saved[f"param.{k}"].shape != p.shape:
                raise ArtifactError(f"{path}: {k} has another shape than in this run")
            p.copy_(saved[f"param.{k}"])
    for k, p in params.items():
        state = {n: saved.get(f"adam.{n}.{k}") for n in ("step", "exp_avg", "exp_avg_sq")}
        if all(v is not None for v in state.values()):
            opt.state[p] = {n: v.clone() for n, v in state.items()}
    gen.set_state(saved["sampler"])
    return saved["losses"].tolist()


def finetune_end_to_end(
    model: Any,
    transcoders: dict[int, Any],
    batches: Sequence[Tensor],
    *,
    steps: int = 200,
    lr: float = 1e-4,
    lr_decay: float = 0.0,
    rows: int = 16,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    reference: Any | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``transcoders`` in place so the model with every MLP replaced by its
    transcoder matches the next-token distribution of ``reference`` (default: ``model``
    itself) on ``batches`` (token rows starting with BOS; each step samples ``rows`` of
    them). ``lr_decay``: as in :func:`kl_training`. Returns the KL per step."""
    data = token_rows(batches)
    params = _params(transcoders)

    def spliced(batch: Tensor, mask: Tensor) -> Tensor:
        hooks = splice_hooks(list(transcoders.values()), mask)
        return model.run_with_hooks(batch, fwd_hooks=hooks)

    for tc in transcoders.values():
        tc.requires_grad_(True)
    model.requires_grad_(False)
    target = reference if reference is not None else model
    try:
        return kl_training(
            target, params, data, spliced, steps=steps, lr=lr, lr_decay=lr_decay, rows=rows,
            seed=seed, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
            desc="fine-tune (KL)", progress=progress,
        )  # fmt: skip
    finally:
        for tc in transcoders.values():
            tc.requires_grad_(False)


def token_rows(batches: Sequence[Tensor]) -> Tensor:
    data = torch.cat(list(batches)) if batches else None
    if data is None or len(data) == 0:
        raise ConfigError("end-to-end training needs at least one row of tokens")
    return data


def kl_training(
    model: Any,
    params: dict[str, Tensor],
    data: Tensor,
    run: Any,
    *,
    steps: int,
    lr: float,
    rows: int = 16,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    validate: Callable[[], float] | None = None,
    validate_every: int = 50,
    validation: list[tuple[int, float]] | None = None,
    lr_decay: float = 0.0,
    desc: str = "train (KL)",
    progress: bool = True,
) -> list[float]:
    """Adam on the named leaf tensors ``params`` to minimise KL(model ‖ ``run``) on contexts
    sampled from ``data``, checkpointed to one file every ``checkpoint_every`` steps and at
    the end (``resume`` continues from it exactly). Returns the KL per step.

    ``validate`` (held-out KL of the current parameters) runs before the first step and every
    ``validate_every`` steps; the run ends with the parameters of its lowest validation KL, so
    training never returns something worse than it started from (Adam's first steps can undo
    a good starting point). ``validation`` (a list) receives the (step, KL) history.
    ``lr_decay``: the fraction of ``steps`` at the end over which the rate falls linearly to
    zero (0: constant), so the last steps settle instead of jumping around a minimum."""
    from acgraph.progress import progress_bar

    if steps < 1 or rows < 1 or validate_every < 1:
        raise ConfigError(
            f"steps, rows and validate_every must be at least 1, got {steps}, {rows} and "
            f"{validate_every}"
        )
    if not 0.0 <= lr_decay <= 1.0:
        raise ConfigError(f"lr_decay must be in 0..1, got {lr_decay}")
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    path = Path(checkpoint) if checkpoint is not None else None
    losses: list[float] = []
    kept = _Kept() if validate is not None else None
    if path is not None and path.is_file():
        if not resume:
            raise ConfigError(
                f"{path} already holds a training checkpoint: resume it, or delete it to start over"
            )
        losses = _restore(path, params, opt, gen, kept)
    if kept is not None and not kept.history:
        kept.record(len(losses), validate(), params)
    bar = progress_bar(range(len(losses), steps), desc=desc, enabled=progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = decayed_lr(step, steps, lr, lr_decay)
        loss = sampled_kl(model, data, rows, gen, run)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        done = step + 1
        if kept is not None and (done == steps or done % validate_every == 0):
            kept.record(done, validate(), params)
        if path is not None and (
            done == steps or (checkpoint_every and done % checkpoint_every == 0)
        ):
            _save(path, params, opt, gen, losses, kept)
    if kept is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(kept.params[k])
        if validation is not None:
            validation[:] = kept.history
    return losses
