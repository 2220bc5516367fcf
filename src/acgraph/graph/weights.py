"""Input-independent virtual weights of the ACG (ACG.md §3-4).

Every source node writes a fixed vector into the residual stream; a target reads the residual
through a norm whose only nonlinearity is one scale per (site, position). So the weight of an
edge is a product of fixed matrices: the source vector, the channel's read-and-write map (a head's
``W_V W_O`` or a skip matrix) and the target's encoder row. This module computes those matrices
from an unprocessed HookedTransformer and its transcoders; nothing here looks at data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ArtifactError

from .attention_bounds import AttentionBounds
from .layout import INDIRECT_KINDS, Channel, Layout


def _check_transcoders(model: Any, transcoders: dict[int, Any]) -> None:
    d_model = model.cfg.d_model
    for layer, tc in transcoders.items():
        want_in = f"blocks.{layer}.ln2.hook_normalized"
        want_out = f"blocks.{layer}.hook_mlp_out"
        if tc.cfg.hook_in != want_in or tc.cfg.hook_out != want_out:
            raise ArtifactError(
                f"the ACG needs MLP transcoders {want_in} -> {want_out}; layer {layer} has "
                f"{tc.cfg.hook_in} -> {tc.cfg.hook_out}"
            )
        if tc.d_in != d_model or tc.d_out != d_model:
            raise ArtifactError(
                f"transcoder for layer {layer} is {tc.d_in}->{tc.d_out}, the model's d_model is "
                f"{d_model}"
            )


class ModelWeights:
    """The model's linear parts, in the form the graph uses (fp32, on the model's device)."""

    def __init__(
        self,
        model: Any,
        transcoders: dict[int, Any],
        bos_token_id: int | None,
        attention_bounds: AttentionBounds | None = None,
    ):
        cfg = model.cfg
        if cfg.normalization_type not in ("LN", "RMS"):
            raise ArtifactError(
                f"the ACG needs unprocessed LayerNorm/RMSNorm weights, got normalization "
                f"{cfg.normalization_type!r} (load the model with acgraph.models.load_model)"
            )
        if getattr(cfg, "attn_only", False) or getattr(cfg, "parallel_attn_mlp", False):
            raise ArtifactError("the ACG supports sequential attention + MLP blocks only")
        _check_transcoders(model, transcoders)
        self.model = model
        self.cfg = cfg
        self.layout = Layout.from_model(model, transcoders)
        self.transcoders = [transcoders[i] for i in range(self.layout.n_layers)]
        self.rms = cfg.normalization_type == "RMS"
        self.eps = float(cfg.eps)
        self.bos_token_id = bos_token_id
        # a cleaned set carries its bounds (load_transcoders); an explicit argument wins
        self.attention_bounds = attention_bounds or getattr(transcoders, "attention_bounds", None)
        blocks = model.blocks
        with torch.no_grad():
            self.W_E = model.W_E.detach()
            self.W_pos = model.W_pos.detach() if self.layout.has_pos else None
            L = self.layout.n_layers
            self.ln1_w = [blocks[i].ln1.w.detach() for i in range(L)]
            self.ln1_b = [self._norm_bias(blocks[i].ln1) for i in range(L)]
            self.W_V = [blocks[i].attn.W_V.detach() for i in range(L)]  # [H, d, dh]
            self.b_V = [blocks[i].attn.b_V.detach() for i in range(L)]  # [H, dh]
            self.W_O = [blocks[i].attn.W_O.detach() for i in range(L)]  # [H, dh, d]
            self.b_O = [blocks[i].attn.b_O.detach() for i in range(L)]  # [d]
            self.W_Q = [blocks[i].attn.W_Q.detach() for i in range(L)]
            self.b_Q = [blocks[i].attn.b_Q.detach() for i in range(L)]
            self.W_K = [blocks[i].attn.W_K.detach() for i in range(L)]
            self.b_K = [blocks[i].attn.b_K.detach() for i in range(L)]
        self.bos_resid = self._bos_residuals() if bos_token_id is not None else None

    def _norm_bias(self, norm: Any) -> Tensor:
        b = getattr(norm, "b", None)
        return b.detach() if b is not None else torch.zeros_like(norm.w.detach())

    @torch.no_grad()
    def _bos_residuals(self) -> Tensor:
        """The real residual at a leading BOS for every site ``0..2L`` ([2L+1, d]): position 0
        sees only itself, so these are constants of the model (the graph's ``bos`` node)."""
        names = []
        for i in range(self.layout.n_layers):
            names += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_mid"]
        last = self.layout.n_layers
        names.append(
            f"blocks.{last}.hook_resid_pre"
            if last < self.layout.n_model_layers
            else f"blocks.{last - 1}.hook_resid_post"
        )
        tokens = torch.tensor([[self.bos_token_id]], device=self.W_E.device)
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        return torch.stack([cache[n][0, 0].float() for n in names])

    # ------------------------------------------------------------------ norms

    def center(self, v: Tensor) -> Tensor:
        return v if self.rms else v - v.mean(-1, keepdim=True)

    def scale(self, x: Tensor) -> Tensor:
        """The norm's scale s(x), one number per position (``[..., d] -> [...]``)."""
        if self.rms:
            return (x.pow(2).mean(-1) + self.eps).sqrt()
        c = x - x.mean(-1, keepdim=True)
        return (c.pow(2).mean(-1) + self.eps).sqrt()

    # ------------------------------------------------------------------ source vectors

    def const_vector(self, site: int) -> Tensor:
        """Sum of every bias written into the residual before ``site``: attention ``b_O`` and
        transcoder ``b_dec`` (head value biases travel inside their channels)."""
        out = torch.zeros_like(self.W_E[0])
        for layer in range(self.layout.n_layers):
            if 2 * layer + 1 <= site:
                out = out + self.b_O[layer]
            if 2 * layer + 2 <= site:
                out = out + self.transcoders[layer].b_dec.detach()
        return out

    def source_vectors(self, site: int) -> Tensor:
        """Residual vector of every source visible at ``site`` ([n_sources, d])."""
        parts = []
        d = self.W_E.shape[1]
        for g in self.layout.space(site).groups:
            if g.kind == "tok":
                parts.append(self.W_E)
            elif g.kind == "pos":
                parts.append(self.W_pos)
            elif g.kind == "const":
                parts.append(self.const_vector(site)[None])
            elif g.kind == "bos":
                bos = self.bos_resid[site] if self.bos_resid is not None else torch.zeros(d)
                parts.append(bos[None].to(self.W_E))
            elif g.kind == "heads":
                parts.append(self.W_O[g.layer].reshape(-1, d))
            elif g.kind == "feats":
                parts.append(self.transcoders[g.layer].W_dec.detach())
            else:  # skip output dimensions
                parts.append(torch.eye(d, dtype=self.W_E.dtype, device=self.W_E.device))
        return torch.cat(parts)

    # ------------------------------------------------------------------ channel maps

    def norm_read(self, v: Tensor, layer: int) -> Tensor:
        """What ln1 of ``layer`` makes of residual vectors, before the 1/s scale (no bias)."""
        return self.center(v) * self.ln1_w[layer]

    def channel_write(self, channel: Channel, vectors: Tensor) -> Tensor:
        """Residual vectors written by ``channel`` per unit of gated source activation."""
        if channel.kind == "direct":
            return vectors
        if channel.kind == "head":
            h = channel.head
            return (
                self.norm_read(vectors, channel.layer)
                @ self.W_V[channel.layer][h]
                @ (self.W_O[channel.layer][h])
            )
        W_skip = self.transcoders[channel.layer].W_skip.detach()
        return self.center(vectors) @ W_skip.T

    def target_read(self, layer: int, vectors: Tensor) -> Tensor:
        """Pre-activation of every feature of ``layer`` per residual vector, before 1/s."""
        return self.center(vectors) @ self.transcoders[layer].W_enc.detach()

    def target_bias(self, layer: int) -> Tensor:
        tc = self.transcoders[layer]
        bias = tc.b_enc.detach()
        if tc.cfg.apply_b_dec_to_input:
            bias = bias - tc.b_dec.detach() @ tc.W_enc.detach()
        return bias

    def channel_weights(
        self,
        channel: Channel,
        target_layer: int,
        rows: Tensor | None = None,
        features_first: bool = False,
    ) -> Tensor:
        """Virtual weights ``[n_rows, n_features]`` of (source, channel) edges into
        ``target_layer``: every slot of the channel (``rows=None``; the last row is the
        channel-bias slot) or the given slots only. Direct edges from head, skip and bos sources
        are zero: those reach targets only through their channels. ``features_first``:
        ``[n_features, n_rows]``, contiguous (the product is formed so, not transposed after)."""
        values, read = self.channel_factors(channel, target_layer, rows)
        return read.T @ values.T if features_first else values @ read

    def channel_factors(
        self,
        channel: Channel,
        target_layer: int,
        rows: Tensor | None = None,
        sources: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`channel_weights` as a product ``values [n_rows, r] @ read [r, n_features]``.
        A head's map has rank d_head, so its weights are ``(read · W_V) · (W_O · W_enc)``
        rather than through the residual (r = d_head: d_model / d_head times fewer operations);
        other channels have r = d_model. ``sources``: the read site's :meth:`source_vectors`,
        when the caller reuses them across channels."""
        site = channel.read_site
        n = self.layout.space(site).size
        rows = torch.arange(n + 1, device=self.W_E.device) if rows is None else rows
        is_bias = rows == n
        sources = self.source_vectors(site) if sources is None else sources
        vectors = sources[rows.clamp(max=n - 1)]
        if channel.kind == "head":
            layer, h = channel.layer, channel.head
            values = self.norm_read(vectors, layer) @ self.W_V[layer][h]
            values[is_bias] = self.ln1_b[layer] @ self.W_V[layer][h] + self.b_V[layer][h]
            return values, self.target_read(target_layer, self.W_O[layer][h])
        if channel.kind == "direct":
            vectors[self._indirect(site)[rows.clamp(max=n - 1)]] = 0
        else:
            vectors = self.channel_write(channel, vectors)
        vectors[is_bias] = 0  # only heads have a channel bias
        return self.center(vectors), self.transcoders[target_layer].W_enc.detach()

    def _indirect(self, site: int) -> Tensor:
        """Which sources at ``site`` reach targets only through a channel (heads, skip, bos)."""
        space = self.layout.space(site)
        out = torch.zeros(space.size, dtype=torch.bool, device=self.W_E.device)
        for g, off in zip(space.groups, space.offsets, strict=True):
            if g.kind in INDIRECT_KINDS:
                out[off : off + g.size] = True
        return out

    # ------------------------------------------------------------------ QK

    def qk_vectors(self, layer: int, head: int) -> tuple[Tensor, Tensor, Tensor]:
        """Query- and key-side vectors of every source at ``layer``'s head site and the query
        bias, all divided by sqrt(attention scale), so that ``score(t, u) = Σ_jm ã_j(t)
        (q_j·k_m) ã_m(u) + k(u)·q_bias + (terms constant in u, which softmax ignores)``,
        with ã = a/s and ``k(u) = Σ_m ã_m(u) k_m``. Rotary models rotate both sides by their
        positions first (:meth:`rotary_tables`): the pair weight is ``q_j·R(u−t) k_m``, and
        the terms with the key bias (:meth:`key_bias`) are no longer constant in u."""
        site = self.layout.head_site(layer)
        read = self.norm_read(self.source_vectors(site), layer)
        root = self._root(layer)
        q = read @ self.W_Q[layer][head] / root
        k = read @ self.W_K[layer][head] / root
        q_bias = (self.ln1_b[layer] @ self.W_Q[layer][head] + self.b_Q[layer][head]) / root
        return q, k, q_bias

    def key_bias(self, layer: int, head: int) -> Tensor:
        """The key every position gets regardless of its residual (ln1 bias and ``b_K``)."""
        return (self.ln1_b[layer] @ self.W_K[layer][head] + self.b_K[layer][head]) / self._root(
            layer
        )

    def keys(self, layer: int, head: int, n1_unbiased: Tensor) -> Tensor:
        """``k(u)`` of :meth:`qk_vectors` from the normalized residual without its bias."""
        return n1_unbiased @ self.W_K[layer][head] / self._root(layer)

    def queries(self, layer: int, head: int, n1_unbiased: Tensor) -> Tensor:
        """``q(t) = Σ_j ã_j(t) q_j`` from the normalized residual without its bias."""
        return n1_unbiased @ self.W_Q[layer][head] / self._root(layer)

    @property
    def rotary(self) -> bool:
        return self.cfg.positional_embedding_type == "rotary"

    def rotary_tables(self, layer: int, T: int) -> tuple[Tensor, Tensor]:
        """``cos, sin`` ``[T, d_head]`` with ``R_t x = x·cos[t] + flip(x)·sin[t]`` (unrotated
        dimensions: cos 1, sin 0)."""
        attn = self.model.blocks[layer].attn
        attn.apply_rotary(torch.zeros(1, T, 1, self.cfg.d_head, device=self.W_E.device))  # extends
        cos, sin = attn.rotary_cos[:T], attn.rotary_sin[:T]
        rest = self.cfg.d_head - cos.shape[1]
        return (
            torch.cat([cos, torch.ones(T, rest, dtype=cos.dtype, device=cos.device)], 1),
            torch.cat([sin, torch.zeros(T, rest, dtype=sin.dtype, device=sin.device)], 1),
        )

    def rotary_flip(self, layer: int, x: Tensor) -> Tensor:
        """The ``flip`` of :meth:`rotary_tables` over the last axis (0 on unrotated dimensions)."""
        r = self.cfg.rotary_dim
        flipped = self.model.blocks[layer].attn.rotate_every_two(x[..., :r])
        return torch.cat([flipped, torch.zeros_like(x[..., r:])], -1)

    def _root(self, layer: int) -> float:
        return float(self.model.blocks[layer].attn.attn_scale) ** 0.5
