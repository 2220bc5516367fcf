"""`SparseDictionary`: one module for SAEs, transcoders and skip transcoders.

Parameters are named and shaped as in SAELens::

    W_enc  [d_in, d_sae]     b_enc [d_sae]
    W_dec  [d_sae, d_out]    b_dec [d_out]
    W_skip [d_out, d_in]     (skip transcoders; zero-initialized)
    threshold [d_sae]        (property: the JumpReLU threshold, where the activation has one)

    encode(x) = act((x - b_dec if apply_b_dec_to_input) @ W_enc + b_enc)
    decode(a, x) = a @ W_dec + b_dec (+ x @ W_skip.T)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acgraph.errors import ConfigError

from .activations import Activation, make_activation
from .config import DictionaryConfig


class _GatherPre(torch.autograd.Function):
    """``pre[row, col]`` for the CSR pattern ``(crow, cols)``, with gradients flowing to
    ``x``, ``W_enc`` and ``b_enc`` through sparse matmuls (``pre`` itself is a constant)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, crow, cols):  # type: ignore[override]
        n = pre.shape[0]
        rows = torch.repeat_interleave(torch.arange(n, device=pre.device), crow.diff())
        ctx.save_for_backward(x, W_enc, crow, cols)
        ctx.d_sae = pre.shape[1]
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, W_enc, crow, cols = ctx.saved_tensors
        n, m = x.shape[0], ctx.d_sae
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            sparse = torch.sparse_csr_tensor(crow, cols, grad.contiguous(), (n, m))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse @ W_enc.T
        if ctx.needs_input_grad[1]:
            grad_w = (sparse.t() @ x).T.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(m, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_x, grad_w, grad_b, None, None, None


class SparseDictionary(nn.Module):
    """A sparse dictionary reading ``cfg.hook_in`` and predicting ``cfg.hook_out``."""

    def __init__(
        self,
        cfg: DictionaryConfig,
        *,
        seed: int | None = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        jumprelu_log_space: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw)) if cfg.has_skip else None
        self.activation: Activation = make_activation(
            cfg.activation,
            d_sae,
            k=cfg.k,
            jumprelu_init_threshold=cfg.jumprelu_init_threshold or 1e-3,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth or 1e-3,
            jumprelu_log_space=jumprelu_log_space,
            batchtopk_decay=cfg.batchtopk_threshold_decay,
        ).to(device=device)
        self.reset_parameters(seed)

    # ------------------------------------------------------------ init

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """Random decoder rows (unit norm; 0.1 for ReLU/JumpReLU), encoder = decoder transposed
        when d_in == d_out (else an independent random matrix), zero biases and ``W_skip``."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        d_in, d_sae, d_out = self.cfg.d_in, self.cfg.d_sae, self.cfg.d_out
        dec = torch.randn(d_sae, d_out, generator=gen, dtype=torch.float32)
        dec /= dec.norm(dim=-1, keepdim=True)
        if self.cfg.activation in ("relu", "jumprelu"):
            dec *= 0.1
        if d_in == d_out:
            enc = dec.T.clone()
        else:
            enc = torch.randn(d_in, d_sae, generator=gen, dtype=torch.float32)
            enc *= dec.norm(dim=-1) / enc.norm(dim=0)
        self.W_dec.copy_(dec)
        self.W_enc.copy_(enc)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    # ------------------------------------------------------------ forward

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return int(self.cfg.d_out)

    @property
    def threshold(self) -> Tensor | None:
        """The JumpReLU threshold [d_sae] (JumpReLU and BatchTopK), else None."""
        if self.cfg.activation not in ("jumprelu", "batchtopk"):
            return None
        theta = self.activation.jumprelu_threshold()
        return theta.expand(self.d_sae).clone() if theta.dim() == 0 else theta

    def pre_acts(self, x: Tensor) -> Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        x = x.to(self.W_enc.dtype)
        if x.dim() == 2:  # one fused kernel: the separate bias add costs ~40% of the matmul
            return torch.addmm(self.b_enc, x, self.W_enc)
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]`` of input activations ``[..., d_in]``."""
        return self.activation(self.pre_acts(x))

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """Output ``[..., d_out]``; skip transcoders also need the input ``x``."""
        out = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ConfigError("a skip transcoder's decode() needs the input activations x")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    def forward_with_acts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(output, acts, pre_acts) in one pass (training and metrics use this)."""
        pre = self.pre_acts(x)
        acts = self.activation(pre)
        return self.decode(acts, x), acts, pre

    def forward_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """TopK/BatchTopK training forward on ``x [n, d_in]`` without dense activations.

        Returns ``(output, values, crow, cols, pre)``: the active latents of row ``i`` are
        ``cols[crow[i]:crow[i+1]]`` with ``values`` (ReLU applied); ``pre`` (no gradient) are
        the dense pre-activations. Gradients match :meth:`forward_with_acts`; the decoder is an
        ``embedding_bag`` and encoder gradients are sparse matmuls, so a step costs about one
        dense matmul instead of five.
        """
        select = getattr(self.activation, "select", None)
        if select is None:
            raise ConfigError(
                f"forward_sparse needs a TopK/BatchTopK activation, not {self.cfg.activation}"
            )
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_in, self.W_enc)
        crow, cols = select(pre)
        values = torch.relu(_GatherPre.apply(x_in, self.W_enc, self.b_enc, pre, crow, cols))
        out = self.decode_sparse(values, crow, cols, x)
        return out, values, crow, cols, pre

    def gather_pre(self, x: Tensor, pre: Tensor, crow: Tensor, cols: Tensor) -> Tensor:
        """Differentiable ``pre[row, col]`` for a CSR pattern (see :meth:`forward_sparse`)."""
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return _GatherPre.apply(x_in, self.W_enc, self.b_enc, pre, crow, cols)

    def decode_sparse(
        self,
        values: Tensor,
        crow: Tensor,
        cols: Tensor,
        x: Tensor | None = None,
        *,
        bias: bool = True,
    ) -> Tensor:
        out = F.embedding_bag(cols, self.W_dec, crow[:-1], mode="sum", per_sample_weights=values)
        if bias:
            out = out + self.b_dec
        if self.W_skip is not None and bias:
            if x is None:
                raise ConfigError("a skip transcoder's decode needs the input activations x")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    # ------------------------------------------------------------ JumpReLU export of TopK

    @torch.no_grad()
    def calibrate_topk_threshold_(self, x: Tensor, max_rows: int = 16_384) -> Tensor:
        """Per-latent JumpReLU thresholds that reproduce this TopK dictionary's firing counts.

        On the rows of ``x`` (at most ``max_rows``), latent ``i`` is among the k largest (and
        positive) pre-activations of ``c_i`` rows; ``theta_i`` is put halfway between the
        ``c_i``-th and ``(c_i + 1)``-th largest pre-activation of latent ``i``, so
        ``pre_i > theta_i`` on exactly ``c_i`` of those rows (up to ties; latents that never
        fire get their largest pre-activation). Stored as ``activation.latent_threshold`` and
        used wherever a TopK dictionary must be written as a JumpReLU (SAELens transcoders,
        circuit-tracer sets): an approximation, since TopK's cut-off varies per token.
        """
        if self.cfg.activation != "topk":
            raise ConfigError("calibrate_topk_threshold_ is for TopK dictionaries")
        x = x.reshape(-1, self.d_in)[:max_rows].to(self.W_enc.dtype)
        n = x.shape[0]
        if n == 0:
            raise ConfigError("calibrate_topk_threshold_ needs at least one row")
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        k = int(self.cfg.k)
        counts = torch.zeros(self.d_sae, dtype=torch.long, device=x.device)
        for rows in x.split(4096):
            values, indices = torch.addmm(self.b_enc, rows, self.W_enc).topk(k, dim=-1)
            counts += torch.bincount(indices[values > 0], minlength=self.d_sae)
        theta = torch.empty(self.d_sae, dtype=self.W_enc.dtype, device=x.device)
        # latents in order of firing count, so each chunk needs only its own few largest values
        for cols in counts.argsort().split(256):
            c = counts[cols]
            top = int(min(n, int(c.max()) + 1))
            pre_t = torch.addmm(self.b_enc[cols], x, self.W_enc[:, cols]).T.contiguous()
            ranked = pre_t.topk(top, dim=-1).values  # [chunk, top], descending
            above = ranked.gather(1, (c - 1).clamp(0, top - 1)[:, None])[:, 0]  # c-th largest
            below = ranked.gather(1, c.clamp(max=top - 1)[:, None])[:, 0]  # (c+1)-th largest
            mid = torch.where(c == 0, ranked[:, 0], (above + below) / 2)
            theta[cols] = torch.where(c >= n, torch.zeros_like(mid), mid)
        theta = theta.clamp(min=0)
        self.activation.latent_threshold = theta  # type: ignore[union-attr]
        return theta

    # ------------------------------------------------------------ decoder norms

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component parallel to each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        rows = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        parallel = (self.W_dec.grad * rows).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * rows)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"kind={c.kind}, {c.hook_in} -> {c.hook_out}, d_in={c.d_in}, d_sae={c.d_sae}, "
            f"d_out={c.d_out}"
        )
