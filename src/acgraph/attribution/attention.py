"""Attention explained: per-head split of edges and the exact QK decomposition of a score.

**Head split.** An edge s -> t sums the linear paths from s to t in the frozen model. Each
path either stays at one position (residual and skip paths only: part ``"residual"``) or
crosses positions; the latter is labelled by the *last* attention head it passes through
before reaching t (part ``"L{layer}.H{head}"``). The parts sum to the edge exactly.

**QK decomposition.** Under frozen norm scales the query of head h at position t is linear in
the node vectors written at positions <= t (through the residual stream, earlier heads' OV
paths with their frozen patterns, and the skip paths), plus a constant (biases, position
embeddings, the BOS position's MLP outputs): ``q = Σ_j q_j + q_0``; likewise ``k = Σ_m k_m +
k_0`` at the key position u. Rotary embeddings rotate every term by its position, which keeps
the sum exact. So the pre-softmax score splits exactly into

    score = [Σ_{j,m} q_j·k_m + Σ_j q_j·k_0 + Σ_m q_0·k_m + q_0·k_0] / attn_scale,

query-side x key-side node pairs plus bias terms. Error nodes are ordinary nodes here, so the
error's share of a score is explicit. The node terms come from the linearized backward; the
constants from a separate replay forward with every node vector removed, so the identity
``Σ terms == real score`` (tested) is a genuine check, not a definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.errors import ConfigError

from .build import Sources, active_sources
from .frozen import Capture, LinearizedModel, capture
from .graph import AttributionGraph
from .replacement import frozen
from .transcoders import TranscoderSet, load_transcoders


@dataclass
class Context:
    """Everything needed to re-run the linearized model of a graph's prompt."""

    model: object
    ts: TranscoderSet
    cap: Capture
    lin: LinearizedModel
    src: Sources
    graph: AttributionGraph


def context(model, transcoders, graph: AttributionGraph) -> Context:
    ts = load_transcoders(transcoders, model)
    cap = capture(model, ts, graph.tokens.to(model.cfg.device))
    lin = LinearizedModel(model, ts, cap)
    src, _ = active_sources(ts, cap, bool(graph.meta.get("zero_first_position", True)))
    if src.feat_layer.shape[0] != graph.n_features:
        raise ConfigError("these transcoders do not give this graph's features")
    return Context(model, ts, cap, lin, src, graph)


def _contract_all(ctx: Context, g: Tensor, layer: int, out: Tensor) -> None:
    """Add edges from ``layer``'s feature and error nodes into ``out [P, N]`` (g at
    resid_post[layer], [P, m, d])."""
    graph, src = ctx.graph, ctx.src
    m = g.shape[1]
    pv, pc = src.pad_vecs[layer][:m], src.pad_cols[layer][:m]
    if pc.shape[1]:
        e = torch.einsum("pmd,mfd->pmf", g, pv)
        keep = pc >= 0
        out[:, pc[keep]] += e[:, keep]
    cols = graph.error_start + layer * graph.n_pos + torch.arange(m)
    out[:, cols] += torch.einsum("pmd,md->pm", g, src.errors[layer, :m])


def _sweep(ctx: Context, g: Tensor, start_layer: int, split_heads: bool) -> tuple[Tensor, list]:
    """Backward from gradients ``g [P, m, d]`` at resid_post[start_layer]; edges [P', N] to
    every node (parts split by last head when ``split_heads``) and the part labels."""
    lin, graph = ctx.lin, ctx.graph
    labels = ["residual"] if split_heads else ["all"]
    out = torch.zeros(g.shape[0], graph.n_nodes)
    for layer in range(start_layer, -1, -1):
        _contract_all(ctx, g, layer, out)
        g = lin.skip_back(layer, g)
        if split_heads:
            heads = lin.attn_term_per_head(layer, g[:1])[:, 0]  # [H, m, d] from the direct part
            g = torch.cat([g[:1], lin.attn_back(layer, g[1:]), heads])
            labels += [f"L{layer}.H{h}" for h in range(heads.shape[0])]
            out = torch.cat([out, torch.zeros(heads.shape[0], graph.n_nodes)])
        else:
            g = lin.attn_back(layer, g)
    m = g.shape[1]
    out[:, graph.token_start + torch.arange(m)] += torch.einsum(
        "pmd,md->pm", g, lin.W_E[ctx.cap.tokens[:m]]
    )
    return out, labels


def head_split(ctx: Context, node: int) -> tuple[list[str], Tensor, Tensor]:
    """(part labels, source node ids, parts [P, n_sources]) of ``node``'s incoming edges.

    Parts sum to the stored edge weights (up to fp32 rounding)."""
    graph, lin, src = ctx.graph, ctx.lin, ctx.src
    kind = graph.node_kind(node)
    layer, pos = graph.node_layer_pos(node)
    p = torch.tensor([pos])
    m = pos + 1
    g = torch.zeros(1, m, lin.W_E.shape[1])
    if kind == "feature":
        enc = lin.ts_enc[layer][:, src.feat_idx[node]][None]
        seed_layer = layer
        g[0, pos] = lin.tc_input_to_mid(layer, p, enc)[0]
    elif kind == "target":
        t = graph.targets[node - graph.target_start]
        seed_layer = t.layer
        if t.kind == "feature":
            enc = lin.ts_enc[t.layer][:, t.feature][None]
            g[0, pos] = lin.tc_input_to_mid(t.layer, p, enc)[0]
        else:
            W_U = lin.W_U
            u = W_U[:, t.vocab_idx] - W_U.mean(-1) if t.kind == "logit" else None
            if u is None:
                raise ConfigError("head_split of a logit-difference target is not supported")
            g[0, pos] = lin.final_to_resid(p, u[None])[0]
    else:
        raise ConfigError(f"{graph.describe(node)} has no incoming edges")
    if seed_layer == lin.n_layers:
        out, labels = _sweep(ctx, g, lin.n_layers - 1, True)
    else:
        # a feature's seed sits in resid_mid[layer]: that layer's attention comes first
        out, labels = _sweep_from_mid(ctx, g, seed_layer)
    cols, _ = graph.row(node)
    return labels, cols, out[:, cols]


def _sweep_from_mid(ctx: Context, g: Tensor, layer: int) -> tuple[Tensor, list]:
    """As :func:`_sweep` for gradients at resid_mid[layer] (feature targets)."""
    lin, graph = ctx.lin, ctx.graph
    heads = lin.attn_term_per_head(layer, g)[:, 0]
    g = torch.cat([g, heads])
    labels = ["residual"] + [f"L{layer}.H{h}" for h in range(heads.shape[0])]
    if layer == 0:
        m = g.shape[1]
        out = torch.zeros(g.shape[0], graph.n_nodes)
        out[:, graph.token_start + torch.arange(m)] += torch.einsum(
            "pmd,md->pm", g, lin.W_E[ctx.cap.tokens[:m]]
        )
        return out, labels
    # continue below: the direct part keeps splitting, head parts propagate in full
    direct, rest = g[:1], g[1:]
    out_d, lab_d = _sweep(ctx, direct, layer - 1, True)
    out_r, _ = _sweep(ctx, rest, layer - 1, False)
    # merge: residual part of the direct sweep stays residual; its head parts are new labels
    out = torch.cat([out_d[:1], out_r, out_d[1:]])
    return out, ["residual", *labels[1:], *lab_d[1:]]


# ---------------------------------------------------------------- QK


@dataclass
class QKStory:
    """The exact decomposition of one head's attention score (see the module doc)."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float  # the real pre-softmax score
    pattern: float  # the real attention weight
    query_nodes: Tensor  # node ids with a nonzero query term (positions <= query_pos)
    key_nodes: Tensor
    pairs: Tensor  # [len(query_nodes), len(key_nodes)] q_j·k_m / scale
    query_bias: Tensor  # [len(query_nodes)] q_j·k_0 / scale
    key_bias: Tensor  # [len(key_nodes)] q_0·k_m / scale
    bias_bias: float  # q_0·k_0 / scale

    @property
    def total(self) -> float:
        return float(
            self.pairs.double().sum()
            + self.query_bias.double().sum()
            + self.key_bias.double().sum()
            + self.bias_bias
        )

    def query_terms(self) -> Tensor:
        """Each query-side node's share of the score (against the whole key)."""
        return self.pairs.sum(1) + self.query_bias

    def key_terms(self) -> Tensor:
        return self.pairs.sum(0) + self.key_bias

    def top_pairs(self, k: int = 10) -> list[tuple[int, int, float]]:
        flat = self.pairs.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices
        nk = self.pairs.shape[1]
        return [
            (int(self.query_nodes[i // nk]), int(self.key_nodes[i % nk]), float(flat[i]))
            for i in idx
        ]


def _rotate(attn, x: Tensor, pos: int) -> Tensor:
    """TransformerLens's rotary rotation of ``x [..., d_head]`` at one position."""
    if attn.cfg.positional_embedding_type != "rotary":
        return x
    r = attn.cfg.rotary_dim
    x_rot, x_pass = x[..., :r], x[..., r:]
    flipped = attn.rotate_every_two(x_rot)
    out = x_rot * attn.rotary_cos[pos].to(x.dtype) + flipped * attn.rotary_sin[pos].to(x.dtype)
    return torch.cat([out, x_pass], -1)


def _side_terms(ctx: Context, layer: int, pos: int, W: Tensor) -> Tensor:
    """Node contributions ``[N, d_head]`` to ``W_h^T ln1(resid_pre[layer])`` at ``pos`` (W is
    [d, d_head]; the LN bias and the projection bias are constants, not included)."""
    lin = ctx.lin
    M = (W * lin.ln1_w[layer][:, None]).T  # [dh, d]
    seed = lin._c(M) / lin.cap.ln1_scale[layer, pos]
    g = torch.zeros(W.shape[1], pos + 1, W.shape[0])
    g[:, pos] = seed
    if layer == 0:
        out = torch.zeros(W.shape[1], ctx.graph.n_nodes)
        out[:, ctx.graph.token_start + torch.arange(pos + 1)] = torch.einsum(
            "pmd,md->pm", g, lin.W_E[ctx.cap.tokens[: pos + 1]]
        )
    else:
        out, _ = _sweep(ctx, g, layer - 1, False)
    return out.T  # [N, dh]


@torch.no_grad()
def _constant_qk(ctx: Context, layer: int) -> tuple[Tensor, Tensor]:
    """q and k (rotated, with biases) of every head at ``layer`` with all node vectors removed:
    embeddings zero, each MLP output reduced to its skip path plus ``b_dec``."""
    model, ts, cap = ctx.model, ctx.ts, ctx.cap
    hooks = []
    for i in range(model.cfg.n_layers):

        def mlp_const(t: Tensor, hook, i=i) -> Tensor:
            # replay gives skip(x) + (features + error + constants): drop the node vectors
            return t - (ctx.src.errors[i] + _feature_sum(ctx, i))[None]

        hooks.append((f"blocks.{i}.hook_mlp_out", mlp_const))
    hooks.append(("hook_embed", lambda t, hook: torch.zeros_like(t)))
    store: dict[str, Tensor] = {}
    rot = model.cfg.positional_embedding_type == "rotary"
    qn = f"blocks.{layer}.attn.hook_{'rot_q' if rot else 'q'}"
    kn = f"blocks.{layer}.attn.hook_{'rot_k' if rot else 'k'}"

    def keep(t: Tensor, hook) -> Tensor:
        store[hook.name] = t[0]
        return t

    with frozen(model, ts, cap), model.hooks(fwd_hooks=[*hooks, (qn, keep), (kn, keep)]):
        model(cap.tokens[None])
    return store[qn], store[kn]


def _feature_sum(ctx: Context, layer: int) -> Tensor:
    """Σ_i a_i W_dec[i] per position at ``layer`` (active feature nodes only)."""
    return ctx.src.pad_vecs[layer].sum(1)


@torch.no_grad()
def qk_story(ctx: Context, layer: int, head: int, query_pos: int, key_pos: int) -> QKStory:
    """Exact decomposition of head ``head`` of ``layer``'s score from ``query_pos`` to
    ``key_pos`` into query-node x key-node pairs plus bias terms."""
    model, cap, graph = ctx.model, ctx.cap, ctx.graph
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= layer < L and 0 <= head < H):
        raise ConfigError(f"no head {head} in layer {layer} (layers 0..{L - 1}, heads 0..{H - 1})")
    if not 0 <= key_pos <= query_pos < graph.n_pos:
        raise ConfigError(
            f"need 0 <= key_pos <= query_pos < {graph.n_pos}, got {key_pos}, {query_pos}"
        )
    attn = model.blocks[layer].attn
    W_Q, W_K = attn.W_Q[head].detach(), attn.W_K[head].detach()  # [d, dh] (GQA repeated)
    q_nodes = _rotate(attn, _side_terms(ctx, layer, query_pos, W_Q), query_pos)
    k_nodes = _rotate(attn, _side_terms(ctx, layer, key_pos, W_K), key_pos)
    q_all, k_all = _constant_qk(ctx, layer)
    kv = head // (H // (k_all.shape[1]))
    q0, k0 = q_all[query_pos, head], k_all[key_pos, kv]
    scale = float(attn.attn_scale)
    qi = (q_nodes.abs().sum(1) > 0).nonzero()[:, 0]
    ki = (k_nodes.abs().sum(1) > 0).nonzero()[:, 0]
    qn, kn = q_nodes[qi], k_nodes[ki]
    _, real = _real_scores(ctx, layer)
    return QKStory(
        layer=layer,
        head=head,
        query_pos=query_pos,
        key_pos=key_pos,
        score=float(real[head, query_pos, key_pos]),
        pattern=float(cap.patterns[layer, head, query_pos, key_pos]),
        query_nodes=qi,
        key_nodes=ki,
        pairs=qn @ kn.T / scale,
        query_bias=qn @ k0 / scale,
        key_bias=kn @ q0 / scale,
        bias_bias=float(q0 @ k0) / scale,
    )


def _real_scores(ctx: Context, layer: int) -> tuple[str, Tensor]:
    name = f"blocks.{layer}.attn.hook_attn_scores"
    _, cache = ctx.model.run_with_cache(ctx.cap.tokens[None], names_filter=[name])
    return name, cache[name][0]
