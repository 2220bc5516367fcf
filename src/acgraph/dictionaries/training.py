"""Train one or many sparse dictionaries at once from one model forward per block of data.

    train_dictionaries(model, tokens, [DictionaryConfig, ...], out_dir, TrainConfig(...))

- Data: :class:`ActivationStream` (one forward feeds every dictionary; bounded shuffle buffer;
  BOS/separator/padding positions excluded; deterministic in (seed, step); optional shards; the
  last block is computed only as far as the remaining steps need).
- Init: ``b_dec`` = mean of the output hook over the first block (``b_dec_init="mean"``; or the
  geometric median, or zeros); decoder rows unit norm for TopK/BatchTopK, whose encoder stays
  the decoder's transpose (ReLU/JumpReLU encoders are scaled to the data, see
  :func:`_scale_encoder_to_data`).
- Loss per dictionary: ``E||y - y_hat||^2 / Var(y)`` (variance fixed from the first block, so the
  loss reads as an FVU) + sparsity penalty (ReLU: L1 x decoder norms; JumpReLU: STE L0) + AuxK
  (TopK/BatchTopK: the ``k_aux`` largest pre-activations of the dead latents predict the
  residual ``y - y_hat``, divided by the residual's variance (``aux_k_normalization``),
  coefficient ``aux_k_coefficient``; dead = no activation for ``dead_tokens`` tokens).
- Adam; learning rate: linear warmup, constant, linear decay over the last ``lr_decay_fraction``
  of the steps; a pure function of the step. The gradient norm is clipped to ``max_grad_norm``
  (1.0, SAELens's clip) measured in the un-normalized loss's units, i.e. on the gradient of
  ``E||y - y_hat||^2`` (+ the other terms on that scale): without it Adam's second moment keeps
  the large early gradients and later steps shrink with the gradient (FVU 0.018 vs 0.010 on the
  organism benchmark).
- Decoder rows of TopK/BatchTopK dictionaries stay unit norm: the gradient component parallel to
  each row is removed before the step and rows are renormalized after it.
- Checkpoints (every ``checkpoint_every`` steps and at the end) in ``out_dir/checkpoints``:
  ``step_XXXXXXXX/{state.json, dict_<i>.safetensors, rng.safetensors}`` then
  ``latest.json`` (the commit point, written atomically). ``resume=True`` restores weights,
  optimizer moments, dead-latent counters, running thresholds, RNG and stream position, and
  continues bit for bit.
- Final dictionaries are written to ``out_dir/<name>/`` in the SAELens layout.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ArtifactError, ConfigError
from acgraph.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

from .activation_stream import (
    AUTOCAST_DTYPES,
    FORWARDS,
    ActivationStream,
    StreamPosition,
    special_token_ids,
)
from .config import DictionaryConfig
from .dictionary import SparseDictionary

CHECKPOINT_FORMAT_VERSION = 1
B_DEC_INITS = ("mean", "geometric_median", "zeros")


@dataclass
class TrainConfig:
    """How to train (shared by every dictionary of a run)."""

    total_tokens: int
    batch_size: int = 4096  # tokens per optimizer step
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 16384) per dictionary (sparsify's rule)
    lr_warmup_steps: int = 50
    lr_decay_fraction: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # gradient-norm clipping on the un-normalized loss's scale (as SAELens: 1.0); None: off
    max_grad_norm: float | None = 1.0
    buffer_tokens: int = 65_536  # shuffle buffer: tokens per block
    model_batch_size: int = 32  # contexts per model forward
    # run the model forward (activations only; dictionaries train in fp32) under autocast to
    # this dtype, as SAELens's `autocast_lm`: "bfloat16" or None (fp32)
    model_autocast: str | None = None
    # "lean" (exact, faster than TransformerLens), "compiled" or "transformer_lens"; how the
    # forward runs, not what it computes, so a run may resume under another one
    model_forward: str = "lean"
    checkpoint_every: int = 500  # steps; 0: only at the end
    seed: int = 0
    b_dec_init: str = "mean"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("total_tokens", "batch_size", "buffer_tokens", "model_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"total_tokens={self.total_tokens} is less than one batch ({self.batch_size})"
            )
        if self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.lr is not None and not (self.lr > 0):
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0")
        if self.model_autocast not in AUTOCAST_DTYPES:
            raise ConfigError(
                f"model_autocast must be one of {sorted(AUTOCAST_DTYPES, key=str)}, "
                f"got {self.model_autocast!r}"
            )
        if self.model_forward not in FORWARDS:
            raise ConfigError(
                f"model_forward must be one of {FORWARDS}, got {self.model_forward!r}"
            )
        if self.model_autocast is not None and self.model_forward == "compiled":
            raise ConfigError(
                "model_autocast runs TransformerLens under autocast, not the compiled forward; "
                "for bf16 with the compiled forward load the model in bf16 (--model-dtype)"
            )
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**data)


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 16384)


def lr_at(step: int, base_lr: float, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    total = cfg.total_steps
    warmup = min(cfg.lr_warmup_steps, max(total // 10, 1))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return decayed_lr(step, total, base_lr, cfg.lr_decay_fraction)


def decayed_lr(step: int, steps: int, lr: float, decay: float) -> float:
    """The rate of ``step`` (0-based) of ``steps``: ``lr``, then over the last ``decay``
    fraction of the steps a linear fall that reaches zero after the last step."""
    n = int(steps * decay)
    return lr if n == 0 or step < steps - n else lr * max(steps - step, 0) / n


@dataclass
class TrainResult:
    dictionaries: list[SparseDictionary]
    steps: int
    tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    out_dir: Path | None = None

    def final_metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# ---------------------------------------------------------------- init helpers


def geometric_median(points: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm, in float64."""
    x = points.double()
    median = x.mean(0)
    for _ in range(iters):
        dist = (x - median).norm(dim=-1).clamp(min=eps)
        weights = 1.0 / dist
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            median = new
            break
        median = new
    return median.float()


class _DictState:
    """One dictionary plus what its training needs (optimizer, counters, loss scale)."""

    def __init__(self, dictionary: SparseDictionary, train_cfg: TrainConfig):
        self.dictionary = dictionary
        self.cfg = dictionary.cfg
        self.base_lr = train_cfg.lr if train_cfg.lr is not None else default_lr(self.cfg.d_sae)
        self.optimizer = torch.optim.Adam(
            dictionary.parameters(), lr=self.base_lr, betas=train_cfg.adam_betas
        )
        device = dictionary.W_enc.device
        self.tokens_since_fired = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=device)
        self.output_variance = torch.ones((), dtype=torch.float32, device=device)

    # --------------------------------------------------------- state <-> tensors

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"module.{k}": v for k, v in self.dictionary.state_dict().items()}
        names = {id(p): n for n, p in self.dictionary.named_parameters()}
        for param, state in self.optimizer.state.items():
            pname = names[id(param)]
            for key, value in state.items():
                out[f"optim.{pname}.{key}"] = torch.as_tensor(value)
        out["tokens_since_fired"] = self.tokens_since_fired
        out["output_variance"] = self.output_variance
        latent = getattr(self.dictionary.activation, "latent_threshold", None)
        if latent is not None:  # the calibrated TopK export threshold (final checkpoint)
            out["latent_threshold"] = latent
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        module = {k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")}
        self.dictionary.load_state_dict(module, strict=True)
        params = dict(self.dictionary.named_parameters())
        self.optimizer.state.clear()
        for key, value in tensors.items():
            if not key.startswith("optim."):
                continue
            pname, _, skey = key[len("optim.") :].rpartition(".")
            if pname not in params:
                raise ArtifactError(f"checkpoint has optimizer state for unknown {pname!r}")
            param = params[pname]
            self.optimizer.state[param][skey] = value.to(
                param.device if value.dim() else "cpu"
            ).clone()
        self.tokens_since_fired = tensors["tokens_since_fired"].clone()
        self.output_variance = tensors["output_variance"].clone()
        if "latent_threshold" in tensors:
            self.dictionary.activation.latent_threshold = tensors["latent_threshold"].clone()


# ---------------------------------------------------------------- one step


def _train_step(
    st: _DictState, x: Tensor, y: Tensor, step: int, train_cfg: TrainConfig
) -> dict[str, float]:
    d, cfg = st.dictionary, st.cfg
    for group in st.optimizer.param_groups:
        group["lr"] = lr_at(step, st.base_lr, train_cfg)
    sparse = cfg.activation in ("topk", "batchtopk")
    if sparse:
        out, values, crow, cols, pre = d.forward_sparse(x)
        active = values > 0
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[cols[active]] = True
        n_active = int(active.sum())
    else:
        out, acts, pre = d.forward_with_acts(x)
        fired = (acts > 0).any(0)
        n_active = int((acts > 0).sum())
    err = out - y
    sq_err = err.pow(2).sum(-1)
    mse = sq_err.mean()
    loss = mse / st.output_variance
    terms: dict[str, float] = {}
    if not sparse:
        coef = cfg.l1_coefficient if cfg.activation == "relu" else cfg.l0_coefficient
        if cfg.sparsity_warmup_steps > 0:
            coef *= min(1.0, (step + 1) / cfg.sparsity_warmup_steps)
        penalty = d.activation.penalty(pre, acts, d.decoder_norms())
        if penalty is not None:
            loss = loss + coef * penalty
            terms["sparsity"] = float(penalty.detach())
    n_tokens = x.shape[0]
    dead = st.tokens_since_fired >= cfg.dead_tokens
    if cfg.aux_k and bool(dead.any()):
        dead_idx = dead.nonzero()[:, 0]
        k_aux = min(int(cfg.k_aux), int(dead_idx.numel()))
        with torch.no_grad():
            local = pre.detach()[:, dead_idx].topk(k_aux, dim=-1, sorted=False).indices
        aux_cols = dead_idx[local].reshape(-1)
        aux_crow = torch.arange(0, n_tokens * k_aux + 1, k_aux, device=x.device)
        aux_values = torch.relu(d.gather_pre(x, pre.detach(), aux_crow, aux_cols))
        residual = (y - out).detach()
        residual_hat = d.decode_sparse(aux_values, aux_crow, aux_cols, bias=False)
        if cfg.aux_k_normalization == "residual":
            scale = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-30)
        else:
            scale = st.output_variance
        aux = (residual_hat - residual).pow(2).sum(-1).mean() / scale
        aux = aux * min(float(dead_idx.numel()) / k_aux, 1.0)
        loss = loss + cfg.aux_k_coefficient * aux
        terms["aux"] = float(aux.detach())
    st.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.normalize_decoder:
        d.remove_parallel_decoder_grad_()
    if train_cfg.max_grad_norm is not None:
        # the loss is divided by Var(y): clip its gradient at max_grad_norm / Var(y), i.e. the
        # un-normalized loss's gradient at max_grad_norm
        max_norm = train_cfg.max_grad_norm / float(st.output_variance)
        torch.nn.utils.clip_grad_norm_(d.parameters(), max_norm)
    st.optimizer.step()
    if cfg.normalize_decoder:
        d.normalize_decoder_()
    with torch.no_grad():
        st.tokens_since_fired += n_tokens
        st.tokens_since_fired[fired] = 0
        every = cfg.resample_every
        if every and (step + 1) % every == 0 and step < cfg.resample_until * train_cfg.total_steps:
            dead_now = st.tokens_since_fired >= cfg.dead_tokens
            if bool(dead_now.any()):
                terms["resampled"] = float(_resample_dead(st, x, y, out.detach(), pre, dead_now))
        centered = (y - y.mean(0)).pow(2).sum(-1).sum()
        fvu = float(sq_err.detach().sum() / centered.clamp(min=1e-30))
        l0 = n_active / n_tokens
        dead_frac = float((st.tokens_since_fired >= cfg.dead_tokens).float().mean())
    return {"loss": float(loss.detach()), "fvu": fvu, "l0": l0, "dead": dead_frac, **terms}


@torch.no_grad()
def _resample_dead(
    st: _DictState, x: Tensor, y: Tensor, out: Tensor, pre: Tensor, dead: Tensor
) -> int:
    """Re-initialize dead latents on the worst reconstructed tokens of the batch.

    Latent ``i`` gets the ``i``-th worst token ``r``: decoder row = the unit residual
    ``y_r - out_r``, encoder = ``c * u`` with ``u`` the unit centred input ``x_r - mean(x)``
    and ``b_enc = -c * u . mean(x)``, so the latent reads "how much like token r", with ``c``
    chosen so its pre-activation on ``r`` equals the ``k``-th largest pre-activation of ``r``
    (TopK; else the residual's norm). Optimizer moments of those rows/columns are reset and the
    latent gets a fresh dead-token window. Deterministic (no random numbers).
    """
    d, cfg = st.dictionary, st.cfg
    idx = dead.nonzero()[:, 0]
    err = (y - out).pow(2).sum(-1)
    n = min(int(idx.numel()), int(err.numel()))
    idx = idx[:n]
    rows = err.topk(n).indices
    x_in = x - d.b_dec if cfg.apply_b_dec_to_input else x
    mean = x_in.mean(0)
    centred = x_in[rows] - mean
    norms = centred.norm(dim=-1).clamp(min=1e-12)
    u = centred / norms[:, None]
    residual = (y - out)[rows]
    if cfg.activation in ("topk", "batchtopk"):
        target = pre[rows].topk(int(cfg.k), dim=-1).values[:, -1].clamp(min=1e-6)
    else:
        target = residual.norm(dim=-1)
    c = target / norms
    d.W_enc[:, idx] = (c[:, None] * u).T
    d.b_enc[idx] = -c * (u @ mean)
    dec = residual / residual.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if not cfg.normalize_decoder:
        dec = dec * d.W_dec[idx].norm(dim=-1, keepdim=True)
    d.W_dec[idx] = dec
    for param, sl in ((d.W_enc, (slice(None), idx)), (d.b_enc, (idx,)), (d.W_dec, (idx,))):
        state = st.optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][sl] = 0
    st.tokens_since_fired[idx] = 0
    return n


# ---------------------------------------------------------------- checkpoints


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder of the last committed checkpoint in ``out_dir`` (None if there is none)."""
    pointer = checkpoint_dir(out_dir) / "latest.json"
    if not pointer.is_file():
        return None
    meta = read_json(pointer)
    path = checkpoint_dir(out_dir) / str(meta.get("path", ""))
    if not (path / "state.json").is_file():
        raise ArtifactError(f"checkpoint pointer {pointer} names a missing folder {path}")
    return path


def _save_checkpoint(
    out_dir: Path,
    states: Sequence[_DictState],
    train_cfg: TrainConfig,
    step: int,
    position: StreamPosition,
    history: list[dict[str, Any]],
    run_info: dict[str, Any],
) -> Path:
    root = checkpoint_dir(out_dir)
    name = f"step_{step:08d}"
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, st in enumerate(states):
        atomic_save_tensors(folder / f"dict_{i}.safetensors", st.state_tensors())
    atomic_save_tensors(folder / "rng.safetensors", {"torch_cpu": torch.get_rng_state()})
    atomic_write_json(
        folder / "state.json",
        {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "step": step,
            "tokens": step * train_cfg.batch_size,
            "position": {"block": position.block, "batch": position.batch},
            "train_config": train_cfg.to_dict(),
            "dictionaries": [st.cfg.to_dict() for st in states],
            "jumprelu_log_space": [
                bool(getattr(st.dictionary.activation, "log_space", True)) for st in states
            ],
            "run": run_info,
            "history": history,
        },
    )
    atomic_write_json(root / "latest.json", {"step": step, "path": name})
    for old in root.glob("step_*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return folder


# ---------------------------------------------------------------- main entry


def _b_dec_init(method: str, y: Tensor) -> Tensor:
    if method == "mean":
        return y.double().mean(0).float()
    if method == "geometric_median":
        sample = y[: min(y.shape[0], 16_384)]
        return geometric_median(sample)
    return torch.zeros(y.shape[-1], dtype=torch.float32, device=y.device)


@torch.no_grad()
def _scale_encoder_to_data(d: SparseDictionary, x: Tensor, y: Tensor, target: float = 0.25) -> None:
    """Scale W_enc so the initial prediction's spread is ``target`` x Var(y) (random decoder
    directions of the target's full size would start at FVU ~ 2)."""
    x, y = x[:8192], y[:8192]
    pre = d.pre_acts(x)
    if d.cfg.activation in ("topk", "batchtopk"):  # per-token top-k, no running statistics
        values, indices = pre.topk(int(d.cfg.k), dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    else:
        acts = d.activation(pre)
    spread = (acts @ d.W_dec).double()
    spread = (spread - spread.mean(0)).pow(2).sum(-1).mean()
    var = (y.double() - y.double().mean(0)).pow(2).sum(-1).mean()
    if spread > 0 and var > 0:
        d.W_enc.mul_(float((target * var / spread).sqrt()))


@torch.no_grad()
def _init_jumprelu_from_data(d: SparseDictionary, x: Tensor) -> None:
    """Resolve unset JumpReLU threshold/bandwidth relative to the pre-activation scale."""
    cfg, act = d.cfg, d.activation
    scale = float(d.pre_acts(x[:8192]).std())
    if cfg.jumprelu_bandwidth is None:
        cfg.jumprelu_bandwidth = 0.05 * scale
        act.bandwidth = cfg.jumprelu_bandwidth  # type: ignore[assignment]
    if cfg.jumprelu_init_threshold is None:
        cfg.jumprelu_init_threshold = 0.1 * scale
        act.set_threshold(  # type: ignore[operator]
            torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, device=x.device)
        )


_IDENTITY_FIELDS = ("name", "kind", "hook_in", "hooks_out", "d_in", "d_out", "d_sae", "activation")


def _check_same_dictionaries(saved: Sequence[DictionaryConfig], given: Sequence[Any], out) -> None:
    """On resume, the dictionaries asked for (if any) must be the checkpoint's."""
    if not given:
        return
    asked = [g.cfg if isinstance(g, SparseDictionary) else g for g in given]

    def key(c: DictionaryConfig) -> tuple:
        k = c.k if c.activation in ("topk", "batchtopk") else None
        return (
            *(getattr(c, f) if f != "hooks_out" else tuple(c.hooks_out) for f in _IDENTITY_FIELDS),
            k,
        )

    if [key(c) for c in asked] != [key(c) for c in saved]:
        raise ConfigError(
            f"cannot resume {out}: the checkpoint trains "
            f"{[f'{c.name} ({c.kind}, {c.activation}, d_sae={c.d_sae})' for c in saved]}, "
            f"not {[f'{c.name} ({c.kind}, {c.activation}, d_sae={c.d_sae})' for c in asked]}"
        )


def _check_names(configs: Sequence[DictionaryConfig]) -> None:
    seen: set[str] = set()
    for cfg in configs:
        if cfg.name in seen:
            raise ConfigError(
                f"two dictionaries share the name {cfg.name!r}; give them distinct names"
            )
        seen.add(str(cfg.name))


def _check_widths(model: Any, tokens: Tensor, configs: Sequence[DictionaryConfig]) -> None:
    """Refuse dictionaries whose d_in/d_out differ from the model's hook widths."""
    from .activation_stream import capture_hooks

    hooks = sorted({h for c in configs for h in (c.hook_in, *c.hooks_out)})
    probe = tokens[:1, : min(tokens.shape[1], 4)].to(model.cfg.device)
    widths = {h: v.shape[-1] for h, v in capture_hooks(model, probe, hooks).items()}
    for cfg in configs:
        for side, hook, width in (
            ("d_in", cfg.hook_in, cfg.d_in),
            ("d_out", cfg.hook_out, cfg.d_out),
        ):
            if widths[hook] != width:
                raise ArtifactError(
                    f"dictionary {cfg.name!r} has {side}={width} but the model's {hook} has "
                    f"width {widths[hook]}"
                )


def train_dictionaries(
    model: Any,
    tokens: Tensor,
    dictionaries: Sequence[DictionaryConfig | SparseDictionary],
    out_dir: str | Path | None,
    train_cfg: TrainConfig,
    *,
    resume: bool = False,
    exclude_token_ids: Sequence[int] | None = None,
    shard_dir: str | Path | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    save_final: bool = True,
) -> TrainResult:
    """Train every dictionary in ``dictionaries`` on activations of ``model`` over ``tokens``.

    ``tokens`` is ``[n_contexts, context_size]`` (see :func:`acgraph.data.tokenize_to_contexts`).
    ``exclude_token_ids`` defaults to the BOS/EOS/padding ids of ``model.tokenizer``.
    ``out_dir`` None: no checkpoints, nothing written. ``callback(step, metrics)`` runs after
    every step.
    """
    out = Path(out_dir) if out_dir is not None else None
    if exclude_token_ids is None:
        exclude_token_ids = special_token_ids(getattr(model, "tokenizer", None))
    ckpt = latest_checkpoint(out) if out is not None else None
    if ckpt is not None and not resume:
        raise ArtifactError(
            f"{out} already holds a training checkpoint ({ckpt.name}); pass resume=True "
            "(--resume) to continue it, or choose another output folder"
        )
    device = model.cfg.device

    saved: dict[str, Any] | None = None
    if ckpt is not None:
        saved = read_json(ckpt / "state.json")
        if saved.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise ArtifactError(f"{ckpt}/state.json has an unknown format_version")
        stored_cfg = TrainConfig.from_dict(saved["train_config"])
        if _resume_key(stored_cfg) != _resume_key(train_cfg):
            raise ConfigError(
                f"cannot resume {out}: the training settings differ from the checkpoint's "
                f"({_diff(stored_cfg, train_cfg)})"
            )
        stored_dtype = saved.get("run", {}).get("model_dtype", "float32")
        if stored_dtype != _model_dtype(model):
            raise ConfigError(
                f"cannot resume {out}: it was trained on the model in {stored_dtype}, "
                f"not {_model_dtype(model)} (pass the same --model-dtype)"
            )
        configs = [DictionaryConfig.from_dict(c) for c in saved["dictionaries"]]
        _check_same_dictionaries(configs, dictionaries, out)
        log_space = saved.get("jumprelu_log_space", [True] * len(configs))
        modules = [
            SparseDictionary(c, seed=None, device=device, jumprelu_log_space=ls)
            for c, ls in zip(configs, log_space, strict=True)
        ]
    else:
        modules = []
        given: set[int] = set()  # modules passed in keep their weights (no data-driven init)
        for i, item in enumerate(dictionaries):
            if isinstance(item, SparseDictionary):
                modules.append(item.to(device))
                given.add(i)
            else:
                modules.append(
                    SparseDictionary(item, seed=train_cfg.seed * 1000 + i, device=device)
                )
        configs = [m.cfg for m in modules]
    if not configs:
        raise ConfigError("no dictionaries to train")
    _check_names(configs)

    hooks: list[str] = []
    for cfg in configs:
        hooks += [cfg.hook_in, *cfg.hooks_out]
    stream = ActivationStream(
        model,
        tokens,
        hooks,
        batch_size=train_cfg.batch_size,
        buffer_tokens=train_cfg.buffer_tokens,
        model_batch_size=train_cfg.model_batch_size,
        exclude_token_ids=exclude_token_ids,
        seed=train_cfg.seed,
        shard_dir=shard_dir,
        device=device,
        autocast=AUTOCAST_DTYPES[train_cfg.model_autocast],
        forward=train_cfg.model_forward,
    )
    _check_widths(model, tokens, configs)
    states = [_DictState(m, train_cfg) for m in modules]
    for m in modules:
        m.train()

    history: list[dict[str, Any]] = []
    step = 0
    position = StreamPosition()
    if saved is not None and ckpt is not None:
        for i, st in enumerate(states):
            st.load_state_tensors(load_tensors(ckpt / f"dict_{i}.safetensors"))
        torch.set_rng_state(load_tensors(ckpt / "rng.safetensors")["torch_cpu"])
        step = int(saved["step"])
        position = StreamPosition(**saved["position"])
        history = list(saved.get("history", []))
    else:
        first_block = stream.block(0)
        for i, st in enumerate(states):
            if st.cfg.model_name is None:
                st.cfg.model_name = str(model.cfg.model_name)
            if st.cfg.context_size is None:
                st.cfg.context_size = int(tokens.shape[1])
            y = first_block[st.cfg.hook_out]
            centered = y.double() - y.double().mean(0)
            st.output_variance = centered.pow(2).sum(-1).mean().float().clamp(min=1e-12)
            if i in given:
                continue
            with torch.no_grad():
                st.dictionary.b_dec.copy_(_b_dec_init(train_cfg.b_dec_init, y))
                if st.cfg.normalize_decoder:
                    st.dictionary.normalize_decoder_()
                if st.cfg.activation not in ("topk", "batchtopk"):
                    # TopK keeps W_enc = W_dec^T (OpenAI / SAELens): with gradient clipping the
                    # large initial error costs nothing, and the scaled-down encoder trained
                    # worse (organism SAE FVU 0.0101 vs 0.0092)
                    _scale_encoder_to_data(st.dictionary, first_block[st.cfg.hook_in], y)
                if st.cfg.activation == "jumprelu":
                    _init_jumprelu_from_data(st.dictionary, first_block[st.cfg.hook_in])

    run_info = {
        "model_name": str(model.cfg.model_name),
        "model_dtype": _model_dtype(model),
        "exclude_token_ids": list(exclude_token_ids),
        "n_contexts": int(tokens.shape[0]),
        "context_size": int(tokens.shape[1]),
    }
    total_steps = train_cfg.total_steps
    result = TrainResult(modules, step, step * train_cfg.batch_size, history, out_dir=out)
    if step >= total_steps:
        if save_final and out is not None:
            _save_final(out, modules, tokens)
        return result

    from acgraph.progress import progress_bar

    bar = progress_bar(
        total=total_steps,
        initial=step,
        desc="training " + ("dictionary" if len(states) == 1 else f"{len(states)} dictionaries"),
        unit="step",
        enabled=train_cfg.progress,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    start_step = step
    batches = stream.batches(position, total_batches=total_steps, batches_done=step)
    try:
        while step < total_steps:
            position, batch = next(batches)
            per_dict = {}
            for st in states:
                per_dict[st.cfg.name] = _train_step(
                    st, batch[st.cfg.hook_in], batch[st.cfg.hook_out], step, train_cfg
                )
            step += 1
            elapsed = max(time.perf_counter() - started, 1e-9)
            tok_s = (step - start_step) * train_cfg.batch_size / elapsed
            summary = _summarize(per_dict)
            if step % max(train_cfg.log_every, 1) == 0 or step == total_steps:
                history.append(
                    {
                        "step": step,
                        "tokens": step * train_cfg.batch_size,
                        **summary,
                        "dictionaries": per_dict,
                    }
                )
                bar.set_postfix(
                    tok_s=f"{tok_s:,.0f}",
                    loss=f"{summary['loss']:.4f}",
                    fvu=f"{summary['fvu']:.4f}",
                    l0=f"{summary['l0']:.1f}",
                    dead=f"{summary['dead']:.3f}",
                    refresh=False,
                )
            bar.update(1)
            if callback is not None:
                callback(step, {"tokens_per_second": tok_s, **summary, "dictionaries": per_dict})
            if step == total_steps:  # before the last checkpoint, which keeps the thresholds
                _calibrate_topk_transcoders(modules, stream)
            every = train_cfg.checkpoint_every
            if out is not None and ((every and step % every == 0) or step == total_steps):
                _save_checkpoint(out, states, train_cfg, step, position, history, run_info)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    for m in modules:
        m.eval()
    result.steps = step
    result.tokens = step * train_cfg.batch_size
    result.history = history
    result.tokens_per_second = (step - start_step) * train_cfg.batch_size / max(elapsed, 1e-9)
    if save_final and out is not None:
        _save_final(out, modules, tokens)
        atomic_write_json(
            out / "training_log.json",
            {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "train_config": train_cfg.to_dict(),
                "steps": step,
                "tokens": result.tokens,
                "tokens_per_second_last_session": result.tokens_per_second,
                "history": history,
            },
        )
    return result


def _summarize(per_dict: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = ("loss", "fvu", "l0", "dead")
    n = len(per_dict)
    return {k: sum(m[k] for m in per_dict.values()) / n for k in keys}


def _model_dtype(model: Any) -> str:
    """The dtype of the model's weights (activations come from it; a resumed run needs the same)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _resume_key(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for volatile in ("progress", "log_every", "checkpoint_every", "model_forward"):
        d.pop(volatile)
    return d


def _diff(a: TrainConfig, b: TrainConfig) -> str:
    da, db = _resume_key(a), _resume_key(b)
    return ", ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db.get(k))


def _calibrate_topk_transcoders(
    modules: Sequence[SparseDictionary], stream: ActivationStream
) -> None:
    """Per-latent JumpReLU thresholds for TopK transcoders (their SAELens / circuit-tracer
    export), from the block that held the last training batch (still in memory)."""
    todo = [m for m in modules if m.cfg.activation == "topk" and m.cfg.is_transcoder]
    data = stream.cached_block()
    if not todo or data is None:
        return
    for m in todo:
        m.calibrate_topk_threshold_(data[m.cfg.hook_in])


def _save_final(out: Path, modules: Sequence[SparseDictionary], tokens: Tensor) -> None:
    from .formats import save_dictionary

    for m in modules:
        if m.cfg.context_size is None:
            m.cfg.context_size = int(tokens.shape[1])
        save_dictionary(m, out / str(m.cfg.name))
