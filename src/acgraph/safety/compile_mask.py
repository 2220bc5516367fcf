"""Compile a ``key-previous`` attention mask (graph/attention_bounds.py, mode ``mask``) into
the GPT-2 that `acg compile` made, so the cleaned network carries its masks.

The mask: in head (l, h), a key whose (previous token, token) pair trusted data never gave at
least ``floor`` gets ``-inf`` before the softmax. That is a lookup on two tokens, a property
of the key position, so GPT-2 can hold it with a wider residual stream and one block in front:

- **extra residual dimensions** after the model's ``d``: a one-hot code of the token (CUR) and
  of the position (POS), both large (R); a tiny copy of the previous token's code (PREV); one
  flag per head (FLAG, 0 or ε); a zero reference (Z) and a sum compensation (COMP).
- **the flag block**, in front of the model's blocks. Two heads attend exactly to the previous
  position (the query's POS code shifted by one against the keys'; margins of hundreds of
  logits) and copy its CUR code, mean-free and scaled down, into PREV. Its MLP detects, with
  saturating ReLU pairs (``relu(z) - relu(z - 1)``: exactly 0 or 1 wherever the detection has a
  margin), each token, each position and each allowed (previous, current) bigram, and writes:
  ``-R`` onto the CUR and POS codes (erasing them), ``-ε`` onto the flag of every head that
  allows the bigram (flags start at ``+ε``), and 0 flags at position 0 (BOS is never masked).
- **the model's blocks**, unchanged in effect: every write into the first ``d`` dimensions is
  made mean-free (LayerNorm removes the mean anyway), so with the extra dimensions near zero a
  LayerNorm over ``d' = d + E`` equals the original over ``d`` once its weight is scaled by
  ``sqrt(d/d')`` and its eps by ``d/d'``. The extra dimensions get LayerNorm weight 0, except
  FLAG and Z in ``ln_1``, which feed one extra query/key dimension per head: a constant query
  times ``(flag - zero)/σ``, a penalty of at least 40 logits on flagged keys.

What is not exact: the CUR/POS erasures leave float rounding (~1e-7 R), the extra dimensions
add O(ε²) to each LayerNorm's variance, and masked keys get ``e^-40`` instead of 0. The result
is measured against the masked ACG (``agreement``), as every compile is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ConfigError

EPS_FLAG = 1e-5  # flag height in the residual: small against the model's own dimensions
PREV_HEIGHT = 1e-3  # size of the copied previous-token code in the residual
PENALTY = 40.0  # logits a flagged key loses at the largest residual scale seen


@dataclass
class Layout:
    """Where each extra residual dimension lives."""

    d: int  # the model's own width
    V: int  # vocabulary
    N: int  # positions
    flags: int  # n_layers * n_heads
    H: int

    @property
    def cur(self) -> int:
        return self.d

    @property
    def pos(self) -> int:
        return self.cur + self.V

    @property
    def prev(self) -> int:
        return self.pos + self.N

    @property
    def flag(self) -> int:
        return self.prev + self.V

    @property
    def zero(self) -> int:
        return self.flag + self.flags

    @property
    def comp(self) -> int:
        return self.zero + 1

    @property
    def width(self) -> int:
        need = self.comp + 1
        return need + (-need) % self.H

    @property
    def head_dim(self) -> int:
        return self.width // self.H


def allowed_bigrams(bounds: Any, n_layers: int, n_heads: int) -> tuple[Tensor, Tensor]:
    """``[n, 2]`` (previous, current) token pairs some head allows, and ``[n, L*H]`` which
    heads allow each (pairs at position 0, with no previous token, are left out: BOS keys
    are never masked)."""
    if bounds.kind != "key-previous" or bounds.mode != "mask":
        raise ConfigError(
            f"only key-previous masks compile (got {bounds.kind} {bounds.mode}): a cap after the "
            "softmax, or a gate on the token after the key, has no GPT-2 construction"
        )
    base = bounds.vocab + 1
    cur, before = bounds.pairs // base, bounds.pairs % base
    ok = bounds.peak >= bounds.floor  # [L, H, n]
    ok = ok.reshape(n_layers * n_heads, -1).T  # [n, L*H]
    real = (before < bounds.vocab) & ok.any(1)
    return torch.stack([before[real], cur[real]], 1), ok[real]


def _center(t: Tensor, d: int) -> Tensor:
    """``t`` with its first ``d`` output dimensions (the last axis) made mean-free."""
    t = t.clone()
    t[..., :d] -= t[..., :d].mean(-1, keepdim=True)
    return t


@torch.no_grad()
def compile_key_previous_mask(net: Any, bounds: Any, calibration: list[Tensor]) -> Any:
    """A new ``GPT2LMHeadModel``: ``net`` (an `acg compile` output) with ``bounds`` (a
    key-previous mask) built in. ``calibration``: token batches to size the margins on."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = net.config
    d, H, L, V, N = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size, cfg.n_positions
    pairs, allow = allowed_bigrams(bounds, L, H)
    lay = Layout(d, V, N, L * H, H)
    D, Dh = lay.width, lay.head_dim
    if Dh < max(N, math.ceil(V / 2)):
        raise ConfigError("the flag block's two copy heads are too narrow for this vocabulary")
    old = net.state_dict()
    emb = old["transformer.wte.weight"][:, None] + old["transformer.wpe.weight"][None]
    R = 100.0 * float(emb.norm(dim=-1).max())  # codes dominate the flag block's LayerNorms
    units = 2 * (V + N + len(pairs))
    n_inner = max(cfg.n_inner, units)
    new_cfg = GPT2Config(**{**cfg.to_dict(), "n_embd": D, "n_layer": L + 1, "n_inner": n_inner})
    new_cfg.layer_norm_epsilon = cfg.layer_norm_epsilon * d / D
    new = GPT2LMHeadModel(new_cfg).eval()
    sd = {k: torch.zeros_like(v) for k, v in new.state_dict().items()}

    # embeddings: the model's, mean-free, plus the token and position codes
    sd["transformer.wte.weight"][:, :d] = _center(old["transformer.wte.weight"], d)
    sd["transformer.wte.weight"][torch.arange(V), lay.cur + torch.arange(V)] = R
    sd["transformer.wpe.weight"][:, :d] = _center(old["transformer.wpe.weight"], d)
    sd["transformer.wpe.weight"][torch.arange(N), lay.pos + torch.arange(N)] = R
    _model_blocks(sd, old, lay, L)
    _mask_scores(sd, lay, _ln1_scales(net, calibration))
    _copy_heads(sd, lay, R)
    new.load_state_dict(sd)
    _flag_mlp(new, sd, lay, pairs, allow, R, calibration)
    new.load_state_dict(sd)
    return new.requires_grad_(False)


def _model_blocks(sd: dict, old: dict, lay: Layout, L: int) -> None:
    """The model's blocks, one later in ``sd``: writes into the first ``d`` dimensions made
    mean-free, LayerNorm weights scaled for the wider stream, heads padded to the new width."""
    d, D, H, Dh = lay.d, lay.width, lay.H, lay.head_dim
    dh, scale = d // H, math.sqrt(d / D)
    for i in range(L):
        o, p = f"transformer.h.{i}.", f"transformer.h.{i + 1}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"][:d] = old[o + ln + ".weight"] * scale
            sd[p + ln + ".bias"][:d] = old[o + ln + ".bias"]
        W, b = old[o + "attn.c_attn.weight"], old[o + "attn.c_attn.bias"]
        Wn, bn = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        q_scale = math.sqrt(Dh / dh)  # GPT-2 divides scores by sqrt(head dim)
        for h in range(H):
            for part, s in ((0, q_scale), (1, 1.0), (2, 1.0)):
                src = slice(part * d + h * dh, part * d + (h + 1) * dh)
                dst = slice(part * D + h * Dh, part * D + h * Dh + dh)
                Wn[:d, dst], bn[dst] = W[:, src] * s, b[src] * s
            rows = slice(h * dh, (h + 1) * dh)
            Wo = old[o + "attn.c_proj.weight"][rows]
            sd[p + "attn.c_proj.weight"][h * Dh : h * Dh + dh, :d] = _center(Wo, d)
        sd[p + "attn.c_proj.bias"][:d] = _center(old[o + "attn.c_proj.bias"], d)
        k = old[o + "mlp.c_fc.weight"].shape[1]
        sd[p + "mlp.c_fc.weight"][:d, :k] = old[o + "mlp.c_fc.weight"]
        sd[p + "mlp.c_fc.bias"][:k] = old[o + "mlp.c_fc.bias"]
        sd[p + "mlp.c_fc.bias"][k:] = -1.0  # padding units never fire
        sd[p + "mlp.c_proj.weight"][:k, :d] = _center(old[o + "mlp.c_proj.weight"], d)
        sd[p + "mlp.c_proj.bias"][:d] = _center(old[o + "mlp.c_proj.bias"], d)
    sd["transformer.ln_f.weight"][:d] = old["transformer.ln_f.weight"] * scale
    sd["transformer.ln_f.bias"][:d] = old["transformer.ln_f.bias"]
    sd["lm_head.weight"][:, :d] = old["lm_head.weight"]


def _mask_scores(sd: dict, lay: Layout, sigma: list[float]) -> None:
    """One more query/key dimension per head of the model's blocks: a constant query against
    ``-(flag - zero)/σ``, large enough to cost PENALTY logits at twice the largest σ seen."""
    D, H, Dh, dh = lay.width, lay.H, lay.head_dim, lay.d // lay.H
    scale = math.sqrt(lay.d / D)
    for i, s in enumerate(sigma):
        p = f"transformer.h.{i + 1}."
        sd[p + "ln_1.weight"][lay.flag + i * H + torch.arange(H)] = 1.0
        sd[p + "ln_1.weight"][lay.zero] = 1.0
        strength = PENALTY * 2 * s * scale * math.sqrt(Dh) / EPS_FLAG
        for h in range(H):
            c = h * Dh + dh
            sd[p + "attn.c_attn.bias"][c] = 1.0
            sd[p + "attn.c_attn.weight"][lay.flag + i * H + h, D + c] = -strength
            sd[p + "attn.c_attn.weight"][lay.zero, D + c] = strength


def _copy_heads(sd: dict, lay: Layout, R: float) -> None:
    """The flag block's attention: heads 0 and 1 look at the previous position (the query's
    position code shifted by one against the keys') and copy its token code, mean-free and
    scaled down to PREV_HEIGHT, into PREV."""
    D, Dh, V, N = lay.width, lay.head_dim, lay.V, lay.N
    p = "transformer.h.0."
    sd[p + "ln_1.weight"][lay.cur : lay.cur + V] = 1.0
    sd[p + "ln_1.weight"][lay.pos : lay.pos + N] = 1.0
    Wn = sd[p + "attn.c_attn.weight"]
    code = R / math.sqrt(2 * R * R / D)  # a code's height after the block's LayerNorm
    sharp = 4.0 * math.sqrt(Dh) / code  # previous position wins by ~4·code logits
    for h, toks in ((0, range(0, min(V, Dh))), (1, range(min(V, Dh), V))):
        for pos in range(1, N):
            Wn[lay.pos + pos, h * Dh + pos - 1] = sharp
        for pos in range(N):
            Wn[lay.pos + pos, D + h * Dh + pos] = 1.0
        for j, t in enumerate(toks):
            Wn[lay.cur + t, 2 * D + h * Dh + j] = 1.0
            row = torch.full((V,), -1.0 / V)
            row[t] += 1.0
            sd[p + "attn.c_proj.weight"][h * Dh + j, lay.prev : lay.prev + V] = (
                row * PREV_HEIGHT / code
            )


def _ln1_scales(net: Any, calibration: list[Tensor]) -> list[float]:
    """Per block, the largest ``sqrt(var + eps)`` its ``ln_1`` divides by on ``calibration``."""
    eps = net.config.layer_norm_epsilon
    most = [0.0] * net.config.n_layer
    hooks = [
        block.ln_1.register_forward_hook(
            lambda m, i, o, n=n: most.__setitem__(
                n, max(most[n], float((i[0].var(-1, unbiased=False) + eps).sqrt().max()))
            )
        )
        for n, block in enumerate(net.transformer.h)
    ]
    try:
        for toks in calibration:
            net(toks)
    finally:
        for h in hooks:
            h.remove()
    return most


def _ln2_inputs(new: Any, toks: Tensor) -> Tensor:
    """The flag block's MLP input (``ln_2`` output) for ``toks``."""
    seen: list[Tensor] = []
    hook = new.transformer.h[0].ln_2.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        new(toks)
    finally:
        hook.remove()
    return seen[0]


def _flag_mlp(
    new: Any, sd: dict, lay: Layout, pairs: Tensor, allow: Tensor, R: float, calibration
) -> None:
    """Units of the flag block's MLP, sized on ``calibration``: token, position and bigram
    detectors as saturating ReLU pairs, writing the erasures and the flags."""
    p = "transformer.h.0."
    V, N = lay.V, lay.N
    for start, size in ((lay.cur, V), (lay.pos, N), (lay.prev, V)):
        sd[p + "ln_2.weight"][start : start + size] = 1.0
    new.load_state_dict(sd)
    x = torch.cat([_ln2_inputs(new, t).reshape(-1, lay.width) for t in calibration])
    toks = torch.cat([t.reshape(-1) for t in calibration])
    pos = torch.cat([torch.arange(t.shape[1]).repeat(t.shape[0]) for t in calibration])
    prev = torch.cat([torch.cat([t[:, :1], t[:, :-1]], 1).reshape(-1) for t in calibration])

    def height(start: int, size: int, ids: Tensor, name: str) -> float:
        """The mean-free code value where the id matches; refuses codes without margins
        (matches within 20% of each other, every other id at most a tenth of a match)."""
        block = x[:, start : start + size]
        block = block - block.mean(-1, keepdim=True)
        hit = block.gather(1, ids[:, None]).squeeze(1)
        miss = block.scatter(1, ids[:, None], -torch.inf).amax(1)
        lo, hi, worst = float(hit.min()), float(hit.max()), float(miss.max())
        if not (lo > 0 and hi <= 1.2 * lo and worst <= 0.1 * lo):
            raise ConfigError(f"compile mask: the {name} code has no margin ({lo}, {hi}, {worst})")
        return lo

    cur_hit = height(lay.cur, V, toks, "token")
    pos_hit = height(lay.pos, N, pos, "position")
    prev_hit = height(lay.prev, V, prev, "previous-token")  # position 0 copies itself
    W_in, b_in = sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]
    W_out, b_out = sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"]
    unit = 0

    def pair(weights: dict[int, float], bias: float, out: dict[int, float]) -> None:
        """relu(z) - relu(z - 1) with z = weights·x + bias, writing ``out`` when it fires."""
        nonlocal unit
        for shift, sign in ((0.0, 1.0), (-1.0, -1.0)):
            for dim, w in weights.items():
                W_in[dim, unit] = w
            b_in[unit] = bias + shift
            for dim, v in out.items():
                W_out[unit, dim] = sign * v
            unit += 1

    def mean_free(start: int, size: int, i: int, gain: float) -> dict[int, float]:
        w = {start + j: -gain / size for j in range(size)}
        w[start + i] += gain
        return w

    # a code alone: matched ~ 2, unmatched <= ~0.3 -> z = 2·value/hit - 0.5 in [1.5, ...] / < 0
    for t in range(V):
        pair(mean_free(lay.cur, V, t, 2.0 / cur_hit), -0.5, {lay.cur + t: -R})
    flag_dims = [lay.flag + f for f in range(lay.flags)]
    for n in range(N):
        out = {lay.pos + n: -R}
        if n == 0:  # BOS keys are never masked
            out |= {f: -EPS_FLAG for f in flag_dims} | {lay.comp: lay.flags * EPS_FLAG}
        pair(mean_free(lay.pos, N, n, 2.0 / pos_hit), -0.5, out)
    # a bigram: both codes ~1 each -> z = 4·(sum - 1.25): both 3, one -1; never at position
    # 0, whose previous-token code is its own (the position-0 code takes 4 off)
    for (a, b), heads in zip(pairs.tolist(), allow, strict=True):
        w = mean_free(lay.prev, V, a, 4.0 / prev_hit)
        for dim, v in mean_free(lay.cur, V, b, 4.0 / cur_hit).items():
            w[dim] = w.get(dim, 0.0) + v
        w |= mean_free(lay.pos, N, 0, -4.0 / pos_hit)
        chosen = [lay.flag + int(f) for f in heads.nonzero().flatten()]
        out = {f: -EPS_FLAG for f in chosen} | {lay.comp: len(chosen) * EPS_FLAG}
        pair(w, -5.0, out)
    b_in[unit:] = -1.0  # padding units never fire
    b_out[lay.flag : lay.flag + lay.flags] = EPS_FLAG
    b_out[lay.comp] = -lay.flags * EPS_FLAG
