"""Compiled MLPs written as a ``transformers.LlamaForCausalLM`` (Llama-family models: RMSNorm,
rotary positions, grouped-query attention; SmolLM2 is one).

A Llama MLP is ``down(act(gate(n)) * up(n))``. With ``hidden_act="relu"``, ``mlp_bias=True``,
``up`` weight 0 and bias 1, it is ``down(relu(gate(n)))``: exactly the ReLU MLP that
compile.py builds from a transcoder, so the same units (JumpReLU pairs, caps, skip pairs, the
BOS unit) go in unchanged. ``post_attention_layernorm`` gets weight 1 so the MLP reads
``ln2.hook_normalized``; attention, embeddings, the other norms and the unembedding are the
model's own, converted back from TransformerLens' layout.
"""

from __future__ import annotations

from typing import Any

import torch

from acgraph.errors import ArtifactError


def check_llama(model: Any) -> None:
    """Refuse what a plain Llama cannot hold."""
    cfg = model.cfg
    if cfg.positional_embedding_type != "rotary" or cfg.normalization_type != "RMS":
        raise ArtifactError(
            "compile writes Llama networks for RMSNorm + rotary models "
            f"(got {cfg.normalization_type}, {cfg.positional_embedding_type})"
        )
    if cfg.rotary_dim != cfg.d_head or getattr(cfg, "rotary_adjacent_pairs", False):
        raise ArtifactError("compile needs rotary over the whole head in halves (Llama's RoPE)")
    if getattr(cfg, "use_NTK_by_parts_rope", False):
        raise ArtifactError("compile does not support scaled RoPE")
    if float(model.blocks[0].attn.attn_scale) != cfg.d_head**0.5:
        raise ArtifactError("compile needs attention scaled by sqrt(d_head) (Llama)")


def _kv(attn: Any, name: str) -> torch.Tensor:
    """K/V weights or biases once per key-value head (TransformerLens repeats them for GQA)."""
    own = getattr(attn, f"_{name}", None)
    return (own if own is not None else getattr(attn, name)).detach()


@torch.no_grad()
def llama_network(model: Any, mlps: list, n_inner: int) -> Any:
    """``model``'s attention, embeddings and norms with ``mlps`` (compile.CompiledMLP) as its
    MLPs, as a ``LlamaForCausalLM``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    d, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    kv_heads = getattr(cfg, "n_key_value_heads", None) or H
    attns = [block.attn for block in model.blocks]
    biased = any(
        float(t.abs().max()) > 0
        for a in attns
        for t in (a.b_Q.detach(), _kv(a, "b_K"), _kv(a, "b_V"), a.b_O.detach())
    )
    tok = getattr(model, "tokenizer", None)
    net = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.d_vocab,
            hidden_size=d,
            intermediate_size=n_inner,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=H,
            num_key_value_heads=kv_heads,
            head_dim=dh,
            hidden_act="relu",
            max_position_embeddings=cfg.n_ctx,
            rms_norm_eps=float(cfg.eps),
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
            attention_bias=biased,
            mlp_bias=True,
            tie_word_embeddings=False,
            bos_token_id=getattr(tok, "bos_token_id", None),
            eos_token_id=getattr(tok, "eos_token_id", None),
            pad_token_id=getattr(tok, "pad_token_id", None),
        )
    ).eval()
    sd = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    sd["model.embed_tokens.weight"] = model.W_E.detach().clone()
    for i, (block, attn, m) in enumerate(zip(model.blocks, attns, mlps, strict=True)):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.ln1.w.detach().clone()
        # TransformerLens [heads, d, d_head] -> HF Linear [heads * d_head, d]
        for name, w in (("q", attn.W_Q.detach()), ("k", _kv(attn, "W_K")), ("v", _kv(attn, "W_V"))):
            sd[p + f"self_attn.{name}_proj.weight"] = w.permute(0, 2, 1).reshape(-1, d).clone()
        sd[p + "self_attn.o_proj.weight"] = attn.W_O.detach().reshape(H * dh, d).T.clone()
        if biased:
            sd[p + "self_attn.q_proj.bias"] = attn.b_Q.detach().reshape(-1).clone()
            sd[p + "self_attn.k_proj.bias"] = _kv(attn, "b_K").reshape(-1).clone()
            sd[p + "self_attn.v_proj.bias"] = _kv(attn, "b_V").reshape(-1).clone()
            sd[p + "self_attn.o_proj.bias"] = attn.b_O.detach().clone()
        sd[p + "post_attention_layernorm.weight"] = torch.ones(d)
        units = m.n_units
        sd[p + "mlp.gate_proj.weight"][:units] = m.W_in.T
        sd[p + "mlp.gate_proj.bias"][:units] = m.b_in
        sd[p + "mlp.gate_proj.bias"][units:] = -1.0  # padding units never fire
        sd[p + "mlp.up_proj.bias"][:] = 1.0  # relu(gate) * 1
        sd[p + "mlp.down_proj.weight"][:, :units] = m.W_out.T
        sd[p + "mlp.down_proj.bias"] = m.b_out.clone()
    sd["model.norm.weight"] = model.ln_final.w.detach().clone()
    sd["lm_head.weight"] = model.W_U.detach().T.clone()
    net.load_state_dict(sd)
    return net.requires_grad_(False)
