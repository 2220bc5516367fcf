"""Sparsifying activation functions, as modules.

Every activation maps pre-activations ``[..., d_sae]`` to non-negative activations of the same
shape and can describe itself as a JumpReLU threshold (``jumprelu_threshold()``), which is how
BatchTopK dictionaries are exported (SAELens ``jumprelu``, circuit-tracer
``activation_function.threshold``).

- :class:`TopK`: the k largest pre-activations per token (then ReLU).
- :class:`BatchTopK`: the ``k * n_tokens`` largest over the whole batch while training; a running
  estimate of the smallest kept value becomes a JumpReLU threshold at inference.
- :class:`JumpReLU`: ``z * H(z - theta)``, trained with straight-through pseudo-derivatives
  (rectangle kernel, bandwidth eps) for theta, with a learnable log-threshold; its sparsity
  penalty is an STE L0.
- :class:`ReLU`: plain ReLU; its sparsity penalty is L1 weighted by decoder-row norms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class Activation(nn.Module):
    """Base class: ``forward(pre) -> acts``; optional sparsity penalty and JumpReLU export."""

    name: str = ""

    def penalty(self, pre: Tensor, acts: Tensor, decoder_norms: Tensor) -> Tensor | None:
        """The unscaled sparsity penalty (mean over tokens), or None when the method has none."""
        return None

    def jumprelu_threshold(self) -> Tensor | None:
        """Per-latent threshold theta such that ``pre * (pre > theta)`` reproduces inference."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"activation": self.name}


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """z * H(z - theta); d/dz = H(z - theta); d/dtheta = -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > threshold).to(grad.dtype) * grad
        kernel = _rectangle((pre - threshold) / eps)
        grad_threshold = -(threshold / eps) * kernel * grad
        grad_threshold = grad_threshold.reshape(-1, threshold.shape[-1]).sum(0)
        return grad_pre, grad_threshold, None


class _StepFn(torch.autograd.Function):
    """H(z - theta); d/dz = 0; d/dtheta = -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        grad_threshold = grad_threshold.reshape(-1, threshold.shape[-1]).sum(0)
        return torch.zeros_like(pre), grad_threshold, None


class ReLU(Activation):
    name = "relu"

    def forward(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def penalty(self, pre: Tensor, acts: Tensor, decoder_norms: Tensor) -> Tensor:
        return (acts * decoder_norms).sum(-1).mean()


class TopK(Activation):
    """Keep the k largest pre-activations of each token (ReLU applied to the kept values).

    While training it also tracks ``running_threshold``, an exponential moving average of the
    per-token cut-off (the k-th largest pre-activation), so a TopK dictionary can be
    *approximated* by a JumpReLU on export (circuit-tracer 0.5.0 and SAELens 6.54 have no TopK
    transcoder). ``latent_threshold`` (per latent, not part of the module's state dict) is a
    better approximation when set: see :meth:`SparseDictionary.calibrate_topk_threshold_`.
    """

    name = "topk"

    def __init__(self, k: int, decay: float = 0.99):
        super().__init__()
        self.k = int(k)
        self.decay = float(decay)
        self.register_buffer("running_threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        self.register_buffer("threshold_updates", torch.tensor(0.0))
        self.latent_threshold: Tensor | None
        self.register_buffer("latent_threshold", None, persistent=False)

    def forward(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        values = torch.relu(values)
        if self.training:
            self._update_threshold(values)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    @torch.no_grad()
    def select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse selection of a ``[n, d_sae]`` batch as CSR ``(crow, cols)`` (k per row)."""
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        if self.training:
            self._update_threshold(torch.relu(values))
        n = pre.shape[0]
        crow = torch.arange(0, n * self.k + 1, self.k, device=pre.device)
        return crow, indices.reshape(-1)

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        cutoff = values.min(-1).values.mean().to(self.running_threshold.dtype)
        _ema_update(self.running_threshold, self.threshold_updates, cutoff, self.decay)

    def jumprelu_threshold(self) -> Tensor:
        """Per-latent thresholds when calibrated, else the scalar running estimate."""
        if self.latent_threshold is not None:
            return self.latent_threshold.detach().clone()
        return self.running_threshold.clamp(min=0).detach().clone()

    def describe(self) -> dict[str, Any]:
        return {"activation": self.name, "k": self.k}

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _ema_update(running: Tensor, updates: Tensor, value: Tensor, decay: float) -> None:
    """Moving average whose decay ramps up (``(1 + n) / (10 + n)``) so early values fade fast."""
    if running < 0:
        running.copy_(value)
    else:
        n = float(updates)
        rate = min(decay, (1.0 + n) / (10.0 + n))
        running.mul_(rate).add_((1 - rate) * value)
    updates.add_(1)


class BatchTopK(Activation):
    """BatchTopK: while training keep the ``k * n_tokens`` largest pre-activations of the batch.

    Each training batch updates ``running_threshold`` (an exponential moving average of the
    smallest kept positive value). In eval mode the activation is the JumpReLU
    ``pre * (pre > running_threshold)``, which is also how it is exported.
    """

    name = "batchtopk"

    def __init__(self, k: int, decay: float = 0.99):
        super().__init__()
        self.k = int(k)
        self.decay = float(decay)
        self.register_buffer("running_threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        self.register_buffer("threshold_updates", torch.tensor(0.0))

    def forward(self, pre: Tensor) -> Tensor:
        if not self.training:
            return self._jumprelu(pre)
        flat = pre.reshape(-1)
        n_tokens = flat.numel() // pre.shape[-1]
        keep = min(self.k * n_tokens, flat.numel())
        values, indices = flat.topk(keep, sorted=False)
        values = torch.relu(values)
        self._update_threshold(values)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre.shape)

    @torch.no_grad()
    def select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse selection of a ``[n, d_sae]`` training batch as CSR ``(crow, cols)``."""
        n, m = pre.shape
        keep = min(self.k * n, n * m)
        values, flat = pre.reshape(-1).topk(keep, sorted=False)
        self._update_threshold(torch.relu(values))
        flat = flat.sort().values
        rows = flat // m
        counts = torch.bincount(rows, minlength=n)
        crow = torch.zeros(n + 1, dtype=torch.long, device=pre.device)
        crow[1:] = counts.cumsum(0)
        return crow, flat % m

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        positive = values[values > 0]
        if positive.numel():
            smallest = positive.min().to(self.running_threshold.dtype)
            _ema_update(self.running_threshold, self.threshold_updates, smallest, self.decay)

    def _jumprelu(self, pre: Tensor) -> Tensor:
        threshold = self.running_threshold.clamp(min=0).to(pre.dtype)
        return pre * (pre > threshold).to(pre.dtype)

    def jumprelu_threshold(self) -> Tensor:
        return self.running_threshold.clamp(min=0).detach().clone()

    def describe(self) -> dict[str, Any]:
        return {"activation": self.name, "k": self.k}

    def extra_repr(self) -> str:
        return f"k={self.k}, threshold={float(self.running_threshold):.4g}"


class JumpReLU(Activation):
    """JumpReLU ``pre * (pre > theta)`` with a learnable per-latent threshold.

    ``log_space=True`` (training from scratch) learns ``log_threshold``; ``log_space=False``
    stores ``threshold`` directly (a dictionary loaded from a file keeps its exact values).
    """

    name = "jumprelu"

    def __init__(
        self,
        d_sae: int,
        init_threshold: float = 1e-3,
        bandwidth: float = 1e-3,
        log_space: bool = True,
    ):
        super().__init__()
        self.bandwidth = float(bandwidth)
        self.log_space = bool(log_space)
        init = torch.full((d_sae,), float(init_threshold))
        if self.log_space:
            self.log_threshold = nn.Parameter(init.log())
        else:
            self.threshold = nn.Parameter(init)

    def current_threshold(self) -> Tensor:
        return self.log_threshold.exp() if self.log_space else self.threshold

    def forward(self, pre: Tensor) -> Tensor:
        return _JumpReLUFn.apply(pre, self.current_threshold().to(pre.dtype), self.bandwidth)

    def penalty(self, pre: Tensor, acts: Tensor, decoder_norms: Tensor) -> Tensor:
        theta = self.current_threshold().to(pre.dtype)
        return _StepFn.apply(pre, theta, self.bandwidth).sum(-1).mean()

    def jumprelu_threshold(self) -> Tensor:
        return self.current_threshold().detach().clone()

    def set_threshold(self, threshold: Tensor) -> None:
        with torch.no_grad():
            if self.log_space:
                self.log_threshold.copy_(threshold.clamp(min=1e-30).log())
            else:
                self.threshold.copy_(threshold)

    def describe(self) -> dict[str, Any]:
        return {"activation": self.name, "bandwidth": self.bandwidth}

    def extra_repr(self) -> str:
        return f"bandwidth={self.bandwidth}, log_space={self.log_space}"


def make_activation(
    activation: str,
    d_sae: int,
    *,
    k: int | None = None,
    jumprelu_init_threshold: float = 1e-3,
    jumprelu_bandwidth: float = 1e-3,
    jumprelu_log_space: bool = True,
    batchtopk_decay: float = 0.99,
) -> Activation:
    """Build an activation module by name (``topk``, ``batchtopk``, ``jumprelu``, ``relu``)."""
    from acgraph.errors import ConfigError

    if activation == "relu":
        return ReLU()
    if activation in ("topk", "batchtopk"):
        if k is None or k < 1:
            raise ConfigError(f"{activation} needs a positive k")
        cls = TopK if activation == "topk" else BatchTopK
        return cls(k, batchtopk_decay)
    if activation == "jumprelu":
        if not math.isfinite(jumprelu_init_threshold) or jumprelu_init_threshold <= 0:
            raise ConfigError("jumprelu_init_threshold must be positive")
        return JumpReLU(d_sae, jumprelu_init_threshold, jumprelu_bandwidth, jumprelu_log_space)
    raise ConfigError(f"unknown activation {activation!r}")
