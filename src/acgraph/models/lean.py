"""A lean forward for reading activations: the HookedTransformer's computation, faster.

Training dictionaries spends most of its time in the model's forward. TransformerLens copies
every weight matrix on every call (``W.T.contiguous()``), materializes and masks the full
attention pattern, and dispatches hooks. This forward packs the weights once (fused QKV and
gate/in projections), uses fused scaled-dot-product attention, keeps the residual stream in
fp32 and runs the matmuls in the weights' dtype (bf16 weights: bf16 matmuls, fp32 residual).
It returns the same hook values as the HookedTransformer (tested to 1e-5 in fp32) for the
residual, normalized and sublayer-output hooks and the architectures listed in
``LEAN_ARCHITECTURES``; ``supports`` says when it applies, and callers fall back to
TransformerLens otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Architectures whose HookedTransformer this forward reproduces (each covered by a test).
LEAN_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM")
_HOOK = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|ln1\.hook_normalized|"
    r"ln2\.hook_normalized|hook_attn_out|hook_mlp_out)$"
)

# (norm, its normalized hook, the sublayer's output hook, the residual hook after it)
_ATTN_HOOKS = ("ln1", "ln1.hook_normalized", "hook_attn_out", "hook_resid_mid")
_MLP_HOOKS = ("ln2", "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")


def layers_needed(hooks: Sequence[str]) -> int:
    """How many blocks the lean forward runs for `hooks` (all of them supported)."""
    return 1 + max(int(_HOOK.match(h).group(1)) for h in hooks)  # type: ignore[union-attr]


def supports(model: Any, hooks: Sequence[str]) -> bool:
    """True when the lean forward computes every hook in `hooks` for this model exactly."""
    c = model.cfg
    plain = (
        c.original_architecture in LEAN_ARCHITECTURES
        and c.normalization_type in ("LN", "RMS")
        and c.positional_embedding_type in ("standard", "rotary")
        and c.attention_dir == "causal"
        and not c.parallel_attn_mlp
        and not c.attn_only
        and not getattr(c, "use_local_attn", False)
        and not getattr(c, "num_experts", None)
        and getattr(c, "attn_scores_soft_cap", -1.0) <= 0
        and not getattr(c, "use_normalization_before_and_after", False)
        and not getattr(c, "post_embedding_ln", False)
        and (model.tokenizer is None or model.tokenizer.padding_side != "left")
    )
    return plain and all(_HOOK.match(h) for h in hooks)


class LeanForward:
    """Packed weights of a HookedTransformer and a hook-free forward over them."""

    def __init__(self, model: Any, n_layers: int | None = None):
        """Packs the first `n_layers` blocks (all by default): a copy of their weights."""
        self.cfg = c = model.cfg
        self.model = model
        self.rms = c.normalization_type == "RMS"
        self.rotary = c.positional_embedding_type == "rotary"
        self.n_heads, self.d_head = c.n_heads, c.d_head
        self.n_kv = c.n_key_value_heads or c.n_heads
        self.layers = [self._pack(block) for block in list(model.blocks)[:n_layers]]

    @torch.no_grad()
    def _pack(self, block: Any) -> dict[str, Any]:
        attn, mlp = block.attn, block.mlp
        # grouped-query attention stores n_kv heads as _W_K..., its W_K repeats them
        gqa = hasattr(attn, "_W_K")
        w_k, w_v = (attn._W_K, attn._W_V) if gqa else (attn.W_K, attn.W_V)
        b_k, b_v = (attn._b_K, attn._b_V) if gqa else (attn.b_K, attn.b_V)

        def heads(w: Tensor) -> Tensor:  # [heads, d_model, d_head] -> [d_model, heads*d_head]
            return w.permute(1, 0, 2).reshape(w.shape[1], -1)

        qkv_w = torch.cat([heads(attn.W_Q), heads(w_k), heads(w_v)], dim=1)
        qkv_b = torch.cat([attn.b_Q.reshape(-1), b_k.reshape(-1), b_v.reshape(-1)])
        layer = {
            "ln1": (block.ln1.w, getattr(block.ln1, "b", None)),
            "ln2": (block.ln2.w, getattr(block.ln2, "b", None)),
            "qkv": (qkv_w.T.contiguous(), qkv_b.contiguous()),  # F.linear layout
            "o": (attn.W_O.reshape(-1, attn.W_O.shape[-1]).T.contiguous(), attn.b_O),
            "scale": 1.0 / float(attn.attn_scale),
            "attn": attn,
            "act": mlp.act_fn,
            "out": (mlp.W_out.T.contiguous(), mlp.b_out),
        }
        if self.cfg.gated_mlp:
            layer["in"] = (torch.cat([mlp.W_gate, mlp.W_in], dim=1).T.contiguous(), mlp.b_in)
        else:
            layer["in"] = (mlp.W_in.T.contiguous(), mlp.b_in)
        return layer

    def _norm(self, x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        """(normalized before the gain, as ln*.hook_normalized; input of the sublayer)."""
        if not self.rms:
            x = x - x.mean(-1, keepdim=True)
        normed = x / (x.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()
        h = normed.to(w.dtype) * w
        return normed, (h if b is None else h + b)

    def _attention(self, layer: dict[str, Any], h: Tensor) -> Tensor:
        batch, pos, _ = h.shape
        qkv = F.linear(h, *layer["qkv"])
        nq, nk = self.n_heads * self.d_head, self.n_kv * self.d_head
        q = qkv[..., :nq].view(batch, pos, self.n_heads, self.d_head)
        k = qkv[..., nq : nq + nk].view(batch, pos, self.n_kv, self.d_head)
        v = qkv[..., nq + nk :].view(batch, pos, self.n_kv, self.d_head)
        if self.rotary:
            q, k = layer["attn"].apply_rotary(q), layer["attn"].apply_rotary(k)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=layer["scale"],
            enable_gqa=self.n_kv != self.n_heads,
        )
        return F.linear(z.transpose(1, 2).reshape(batch, pos, nq), *layer["o"])

    def _mlp(self, layer: dict[str, Any], h: Tensor) -> Tensor:
        pre = F.linear(h, layer["in"][0])
        if self.cfg.gated_mlp:
            gate, lin = pre.chunk(2, dim=-1)
            post = layer["act"](gate) * lin + layer["in"][1]
        else:
            post = layer["act"](pre + layer["in"][1])
        return F.linear(post, *layer["out"])

    @torch.no_grad()
    def run(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        """``{hook: [batch, pos, d] fp32}`` for `hooks`, running only the layers they need."""
        wanted: dict[int, dict[str, str]] = {}
        for hook in hooks:
            match = _HOOK.match(hook)
            if match is None:
                raise ValueError(f"the lean forward does not compute {hook}")
            wanted.setdefault(int(match.group(1)), {})[match.group(2)] = hook
        if max(wanted) >= len(self.layers):
            raise ValueError(f"{len(self.layers)} blocks were packed; layer {max(wanted)} asked")
        m = self.model
        resid = m.embed.W_E[tokens].float()
        if not self.rotary:
            resid = resid + m.pos_embed.W_pos[: tokens.shape[1]].float()
        out: dict[str, Tensor] = {}
        for i in range(max(wanted) + 1):
            layer, keep = self.layers[i], wanted.get(i, {})

            def put(name: str, value: Tensor, keep: dict[str, str] = keep) -> None:
                if name in keep:
                    out[keep[name]] = value

            put("hook_resid_pre", resid)
            for sublayer, (ln, normalized, output, resid_after) in (
                (self._attention, _ATTN_HOOKS),
                (self._mlp, _MLP_HOOKS),
            ):
                normed, h = self._norm(resid, *layer[ln])
                put(normalized, normed)
                delta = sublayer(layer, h).float()
                put(output, delta)
                resid = resid + delta
                put(resid_after, resid)
        return out
