"""The local replacement model of one prompt, linearized: a real forward pass, then explicit
transposed Jacobians of every block with attention patterns and norm scales frozen.

With patterns and scales fixed, each MLP replaced by its transcoder's skip path plus constants
(features, error and ``b_dec`` are sources, not functions of the residual), the residual stream
is linear in the node vectors. This module applies the transposed maps directly (no autograd,
no hooks), so a batch of targets costs a few batched matmuls per layer, and only over the
positions at or before the batch's last target position (causality).

Conventions (the same as circuit-tracer, so edges agree one to one):
- A feature target's value is its pre-activation ``W_enc[:, f] · x_in`` (``x_in`` the
  transcoder input, e.g. ``ln2.hook_normalized``); a logit target's is ``u · ln_final(x)``.
- Sources write ``a · W_dec[f]`` (features) or the error vector into ``hook_mlp_out``, or the
  token embedding into ``hook_embed``. Position embeddings and biases are constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.errors import ConfigError

from .transcoders import TranscoderSet


@dataclass
class Capture:
    """What the real forward pass leaves behind (batch dimension dropped)."""

    tokens: Tensor  # [n]
    logits: Tensor  # [n, vocab]
    ln1_scale: Tensor  # [L, n]
    ln2_scale: Tensor  # [L, n]
    lnf_scale: Tensor  # [n]
    patterns: Tensor  # [L, H, n, n]
    tc_in: Tensor  # [L, n, d] transcoder inputs
    mlp_out: Tensor  # [L, n, d]


def check_model(model) -> None:
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False):
        raise ConfigError("attribution does not support parallel attention/MLP blocks yet")
    if cfg.normalization_type not in ("LN", "RMS"):
        raise ConfigError(
            f"attribution needs real LayerNorm/RMSNorm (got {cfg.normalization_type}); load the "
            "model unprocessed (acgraph.models.load_model does)"
        )
    if getattr(cfg, "attn_only", False):
        raise ConfigError("attribution needs MLP layers (attn_only model)")


def tc_input_name(ts: TranscoderSet, layer: int) -> str:
    return f"blocks.{layer}.{ts.input_hook}"


@torch.no_grad()
def capture(model, ts: TranscoderSet, tokens: Tensor) -> Capture:
    """One real forward pass over ``tokens [n]`` keeping scales, patterns and MLP in/outputs."""
    check_model(model)
    L = model.cfg.n_layers
    names = {"ln_final.hook_scale"}
    for i in range(L):
        names |= {
            f"blocks.{i}.ln1.hook_scale",
            f"blocks.{i}.ln2.hook_scale",
            f"blocks.{i}.attn.hook_pattern",
            f"blocks.{i}.hook_mlp_out",
            tc_input_name(ts, i),
        }
    logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)

    def stack(fmt: str) -> Tensor:
        return torch.stack([cache[fmt.format(i)][0] for i in range(L)])

    return Capture(
        tokens=tokens,
        logits=logits[0].float(),
        ln1_scale=stack("blocks.{}.ln1.hook_scale")[..., 0],
        ln2_scale=stack("blocks.{}.ln2.hook_scale")[..., 0],
        lnf_scale=cache["ln_final.hook_scale"][0, :, 0],
        patterns=stack("blocks.{}.attn.hook_pattern"),
        tc_in=torch.stack([cache[tc_input_name(ts, i)][0] for i in range(L)]),
        mlp_out=stack("blocks.{}.hook_mlp_out"),
    )


class LinearizedModel:
    """Transposed Jacobians of the frozen model; every method maps gradients ``g [B, m, d]``
    w.r.t. a residual point (positions ``0..m-1``) to gradients at an earlier point."""

    def __init__(self, model, ts: TranscoderSet, cap: Capture):
        cfg = model.cfg
        self.n_layers = cfg.n_layers
        self.center = cfg.normalization_type == "LN"  # RMSNorm does not subtract the mean
        self.cap = cap
        self.input_normalized = ts.input_hook == "ln2.hook_normalized"
        blocks = model.blocks
        self.ln1_w = torch.stack([b.ln1.w.detach() for b in blocks])  # [L, d]
        self.lnf_w = model.ln_final.w.detach()
        # W_V [H, d, dh] and W_O [H, dh, d] per layer (GQA: TL repeats the KV heads)
        self.W_V = [b.attn.W_V.detach() for b in blocks]
        self.W_O = [b.attn.W_O.detach() for b in blocks]
        self.W_skip = [ts.skip(i) for i in range(self.n_layers)]
        self.ts_enc = [ts[i].W_enc.detach() for i in range(self.n_layers)]  # [d_in, d_sae]
        self.W_E = model.W_E.detach()
        self.W_U = model.W_U.detach()

    def _c(self, v: Tensor) -> Tensor:
        return v - v.mean(-1, keepdim=True) if self.center else v

    def _c_(self, v: Tensor) -> Tensor:
        """:meth:`_c` in place (``v`` is a temporary of the caller's)."""
        return v.sub_(v.mean(-1, keepdim=True)) if self.center else v

    # ------------------------------------------------------------ seeds

    def tc_input_to_mid(self, layer: int, pos: Tensor, vecs: Tensor) -> Tensor:
        """Gradient w.r.t. resid_mid of ``vecs · x_in`` at ``pos`` (vecs [B, d])."""
        if not self.input_normalized:
            return vecs
        return self._c(vecs) / self.cap.ln2_scale[layer, pos][:, None]

    def final_to_resid(self, pos: Tensor, vecs: Tensor) -> Tensor:
        """Gradient w.r.t. the final residual of ``vecs · ln_final(x)`` at ``pos``."""
        return self._c(vecs * self.lnf_w) / self.cap.lnf_scale[pos][:, None]

    # ------------------------------------------------------------ blocks
    # The elementwise steps run in place on fresh temporaries (and on ``g`` itself with
    # ``inplace=True``): the same operations in the same order, so the same bits, with fewer
    # [B, m, d] buffers alive and allocated per batch.

    def skip_back(self, layer: int, g: Tensor, inplace: bool = False) -> Tensor:
        """resid_post -> resid_mid: identity plus the transcoder's skip path (``inplace``:
        ``g`` is overwritten with the result)."""
        w = self.W_skip[layer]
        if w is None:
            return g
        m = g.shape[1]
        s = g @ w
        if self.input_normalized:
            s = self._c_(s).div_(self.cap.ln2_scale[layer, :m, None])
        return g.add_(s) if inplace else g + s

    def attn_back(self, layer: int, g: Tensor, inplace: bool = False) -> Tensor:
        """resid_mid -> resid_pre: identity plus every head's OV path under the frozen pattern
        (``inplace``: ``g`` is overwritten with the result)."""
        a = self.attn_term(layer, g)
        return g.add_(a) if inplace else g + a

    def attn_term(self, layer: int, g: Tensor, heads: Tensor | None = None) -> Tensor:
        """The attention part of :meth:`attn_back` (restricted to ``heads`` when given)."""
        m = g.shape[1]
        A = self.cap.patterns[layer][:, :m, :m]  # [H, t, u]
        W_O, W_V = self.W_O[layer], self.W_V[layer]
        if heads is not None:
            A, W_O, W_V = A[heads], W_O[heads], W_V[heads]
        gv = torch.einsum("htu,bthe->buhe", A, torch.einsum("btd,hed->bthe", g, W_O))
        gn = torch.einsum("buhe,hde->bud", gv, W_V)
        del gv
        return self._c_(gn.mul_(self.ln1_w[layer])).div_(self.cap.ln1_scale[layer, :m, None])

    def attn_term_per_head(self, layer: int, g: Tensor) -> Tensor:
        """Per-head attention parts ``[H, B, m, d]`` (they sum to :meth:`attn_term`)."""
        m = g.shape[1]
        A = self.cap.patterns[layer][:, :m, :m]
        gv = torch.einsum("htu,bthe->buhe", A, torch.einsum("btd,hed->bthe", g, self.W_O[layer]))
        gn = torch.einsum("buhe,hde->hbud", gv, self.W_V[layer])
        del gv
        gn = self._c_(gn.mul_(self.ln1_w[layer]))
        return gn.div_(self.cap.ln1_scale[layer, None, :m, None])
