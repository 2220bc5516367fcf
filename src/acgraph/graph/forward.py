"""`ACGModel`: compute the model's logits from nothing but the graph's nodes and edges.

One pass per layer ``l`` of the graph, on the graph's own residual (the sum of node
contributions, ACG.md §1):

1. the ln1 scale node and the attention pattern: from the graph residual (levels 1-2) or from
   the kept query-key source pairs (level 3), capped by the weights' attention bounds where
   it has any (`acg clean`, attention_bounds.py);
2. head outputs ``z`` (value vectors mixed by the pattern): nodes that later channels read;
3. the ln2 scale node, then every feature's pre-activation: through the transcoder encoder on
   the graph residual (``edges=None``: level 1, all edges at once) or from the feature's kept
   in-edges only (an :class:`EdgeSet`), then the transcoder's own activation;
4. the layer's write: ``acts @ W_dec + b_dec + skip``.

Position 0 holds a leading BOS, whose whole residual is a constant of the model (the ``bos``
node). No MLP of the original model is ever called. Layers past the graph (a graph over the first
few layers only) run as the real model on the graph's residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from acgraph.errors import ConfigError

from .layout import Channel
from .weights import ModelWeights

KEY_CHUNK = 64  # key-side sources per step of rotary level 3


@dataclass
class ChannelEdges:
    """The kept edges of one channel into one target layer."""

    channel: Channel
    slots: Tensor  # [n_used] source slots at the channel's read site (the last slot is the bias)
    weight: Tensor  # [n_features, n_used] (dense, or sparse CSR when large)


@dataclass
class LayerEdges:
    channels: list[ChannelEdges]
    bias: Tensor  # [n_features]: encoder bias + the folded means of dropped edges


@dataclass
class QKPairs:
    """Level 3 attention for one head: kept (query source, key source) pairs and a key-side
    linear term (the query bias, plus dropped pairs with the query side at its mean)."""

    q_slots: Tensor  # [n_q]
    k_slots: Tensor  # [n_k]
    weight: Tensor  # [n_q, n_k] dense, or its transpose [n_k, n_q] as sparse CSR
    query_vec: Tensor  # [d_head]: dotted with the key of the whole graph residual
    key_corr: Tensor  # [n_k]: minus the kept pairs at their query mean
    rotary: RotaryPairs | None = None  # rotary models: the pairs as vectors (weight unused)


@dataclass
class RotaryPairs:
    """Level 3 attention of one head of a rotary model, where a pair's weight depends on the
    offset: ``score(t, u) = Σ_kept (ã_j(t) − μ_j) ã_m(u) R_t q_j · R_u k_m + R_t query_vec ·
    R_u (k(u) + key_bias) + R_t (q(t) − mean_query) · R_u key_bias``, q(t) and k(u) of the whole
    graph residual. With every pair kept this is the exact score."""

    kept: list[Tensor]  # sparse CSR [KEY_CHUNK, n_q] blocks of [n_k, n_q]: 1 where (j, m) is kept
    q_vecs: Tensor  # [n_q, d_head]
    k_vecs: Tensor  # [n_k, d_head]
    q_mean: Tensor  # [n_q]: μ_j, the mean of ã_j on query positions
    mean_query: Tensor  # [d_head]: Σ_j μ_j q_j over every source
    key_bias: Tensor  # [d_head]


class Replacement:
    """Where a run lets outside code substitute node values (hypotheses, attribution).

    Each method gets the values the graph computed and the trace so far (upstream nodes only)
    and returns the values the rest of the run uses. The default changes nothing.
    """

    def scores(self, layer: int, scores: Tensor, trace: Trace) -> Tensor:
        """``[B, H, T, T]`` attention scores before the causal mask."""
        return scores

    def pattern(self, layer: int, pattern: Tensor, trace: Trace) -> Tensor:
        return pattern

    def attn_out(self, layer: int, out: Tensor, trace: Trace) -> Tensor:
        return out

    def acts(self, layer: int, acts: Tensor, trace: Trace) -> Tensor:
        return acts

    def mlp_out(self, layer: int, out: Tensor, trace: Trace) -> Tensor:
        return out


@dataclass
class Trace:
    """Every node value of one run ([batch, pos, ...])."""

    tokens: Tensor
    s1: list[Tensor] = field(default_factory=list)
    pattern: list[Tensor] = field(default_factory=list)  # [B, H, T, T]
    z: list[Tensor] = field(default_factory=list)  # [B, T, H*dh]
    s2: list[Tensor] = field(default_factory=list)
    pre: list[Tensor] = field(default_factory=list)
    acts: list[Tensor] = field(default_factory=list)
    skip: list[Tensor] = field(default_factory=list)
    resid: list[Tensor] = field(default_factory=list)  # graph residual per site
    columns: dict[int, Tensor] = field(default_factory=dict)  # source columns read per site
    logits: Tensor | None = None


class ACGModel:
    """The runnable graph of ``weights`` (a :class:`ModelWeights`).

    ``edges[l]`` (optional) replaces the dense encoder of layer ``l`` by kept in-edges;
    ``qk[l][h]`` (optional) replaces head ``h``'s score by its kept source pairs.
    """

    def __init__(
        self,
        weights: ModelWeights,
        edges: dict[int, LayerEdges] | None = None,
        qk: dict[int, dict[int, QKPairs]] | None = None,
    ):
        self.w = weights
        self.layout = weights.layout
        self.edges = edges or {}
        self.qk = qk or {}
        self._plan()

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> Tensor:
        return self.run(tokens).logits

    def run(
        self,
        tokens: Tensor,
        *,
        keep_resid: bool = False,
        replace: Replacement | None = None,
        grad: bool = False,
        until: int | None = None,
    ) -> Trace:
        """Every node value of one run. ``replace`` substitutes node values as they are
        computed; ``grad`` keeps autograd on (for gradients with respect to substituted
        values); ``until`` stops once that graph layer's features are computed (no logits:
        statistics and fitting need nothing above it)."""
        with torch.set_grad_enabled(grad):
            return self._run(tokens, keep_resid, replace or Replacement(), until)

    def _run(
        self, tokens: Tensor, keep_resid: bool, replace: Replacement, until: int | None
    ) -> Trace:
        tokens = self._check_tokens(tokens)
        w, model = self.w, self.w.model
        B, T = tokens.shape
        trace = Trace(tokens=tokens)
        x = w.W_E[tokens]
        if w.W_pos is not None:
            x = x + w.W_pos[:T]
        x = self._pin_bos(x, 0)
        for layer in range(self.layout.n_layers):
            if keep_resid:
                trace.resid.append(x)
            attn = model.blocks[layer].attn
            s1 = w.scale(x)
            n1 = w.center(x) / s1[..., None] * w.ln1_w[layer] + w.ln1_b[layer]
            q, k, v = attn.calculate_qkv_matrices(n1, n1, n1)
            if layer in self.qk:
                scores = self._pair_scores(trace, n1 - w.ln1_b[layer], s1, layer)
            else:
                if self.w.cfg.positional_embedding_type == "rotary":
                    q, k = attn.apply_rotary(q), attn.apply_rotary(k)
                scores = attn.calculate_attention_scores(q, k)
            trace.s1.append(s1)
            scores = attn.apply_causal_mask(replace.scores(layer, scores, trace))
            pattern = F.softmax(scores, dim=-1)
            if w.attention_bounds is not None:
                pattern = w.attention_bounds.apply(layer, pattern, tokens)
            pattern = replace.pattern(layer, pattern, trace)
            trace.pattern.append(pattern)
            z = attn.calculate_z_scores(v, pattern)  # [B, T, H, dh]
            out = torch.einsum("bthd,hdm->btm", z, w.W_O[layer]) + w.b_O[layer]
            x = self._pin_bos(x + replace.attn_out(layer, out, trace), 2 * layer + 1)
            z = z.flatten(2).clone()
            z[:, 0] = 0  # position 0 is the bos node; its head outputs are inside it
            trace.z.append(z)
            if keep_resid:
                trace.resid.append(x)

            tc = w.transcoders[layer]
            s2 = w.scale(x)
            h2 = w.center(x) / s2[..., None]
            trace.s2.append(s2)
            pre = self._edge_preacts(trace, layer) if layer in self.edges else tc.pre_acts(h2)
            acts = tc.activation(pre)
            if torch.is_grad_enabled():  # a ReLU's backward reads its output: no in-place edit
                acts = acts.clone()
            acts[:, 0] = 0
            acts = replace.acts(layer, acts, trace)
            skip = h2 @ tc.W_skip.T if tc.W_skip is not None else None
            if skip is not None:
                skip[:, 0] = 0
            trace.pre.append(pre)
            trace.acts.append(acts)
            trace.skip.append(skip)
            if layer == until:
                return trace
            out = acts @ tc.W_dec + tc.b_dec + (skip if skip is not None else 0)
            x = self._pin_bos(x + replace.mlp_out(layer, out, trace), 2 * layer + 2)
        for block in model.blocks[self.layout.n_layers :]:
            x = block(x)
        if keep_resid:
            trace.resid.append(x)
        trace.logits = model.unembed(model.ln_final(x))
        return trace

    # ------------------------------------------------------------------ helpers

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ConfigError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.layout.n_ctx:
            raise ConfigError(f"{tokens.shape[1]} tokens exceed the context of {self.layout.n_ctx}")
        bos = self.w.bos_token_id
        if bos is None:
            raise ConfigError("the ACG needs a model whose sequences start with a BOS token")
        if not bool((tokens[:, 0] == bos).all()):
            raise ConfigError(f"every sequence must start with the BOS token (id {bos})")
        return tokens.to(self.w.W_E.device)

    def _pin_bos(self, x: Tensor, site: int) -> Tensor:
        x = x.clone()
        x[:, 0] = self.w.bos_resid[site]
        return x

    def source_columns(self, trace: Trace, site: int, slots: Tensor) -> Tensor:
        """Activations ``[B, T, len(slots)]`` of the given source slots at ``site`` (the bias
        slot, one past the last source, reads as 1). Sorted slots are assembled block by
        block; any other order goes through a sort."""
        if len(slots) > 1 and not bool((slots[1:] >= slots[:-1]).all()):
            order = slots.argsort()
            cols = self.source_columns(trace, site, slots[order])
            return cols[..., order.argsort()]
        tokens = trace.tokens
        B, T = tokens.shape
        space = self.layout.space(site)
        dtype = self.w.W_E.dtype
        later = torch.ones(B, T, 1, dtype=dtype, device=tokens.device)
        later[:, 0] = 0
        blocks = []
        bounds = torch.tensor(space.offsets + [space.size, space.size + 1], device=slots.device)
        cuts = torch.searchsorted(slots, bounds).tolist()
        for i, (g, off) in enumerate(zip(space.groups, space.offsets, strict=True)):
            if cuts[i] == cuts[i + 1]:
                continue
            local = slots[cuts[i] : cuts[i + 1]] - off
            if g.kind == "tok":
                vals = (tokens[..., None] == local).to(dtype) * later
            elif g.kind == "pos":
                pos = torch.arange(T, device=tokens.device)[None, :, None]
                vals = (pos == local).to(dtype).expand(B, T, len(local)) * later
            elif g.kind == "const":
                vals = later.expand(B, T, len(local))
            elif g.kind == "bos":
                vals = (1 - later).expand(B, T, len(local))
            elif g.kind == "heads":
                vals = trace.z[g.layer][..., local]
            elif g.kind == "feats":
                vals = trace.acts[g.layer][..., local]
            else:
                vals = trace.skip[g.layer][..., local]
            blocks.append(vals)
        n_bias = cuts[-1] - cuts[-2]
        if n_bias:
            blocks.append(torch.ones(B, T, n_bias, dtype=dtype, device=tokens.device))
        if not blocks:
            return torch.zeros(B, T, 0, dtype=dtype, device=tokens.device)
        return torch.cat(blocks, -1)

    def _site_columns(self, trace: Trace, site: int) -> Tensor:
        """Columns of every slot any edge or pair reads at ``site``, computed once per run."""
        cache = trace.columns
        if site not in cache:
            cache[site] = self.source_columns(trace, site, self._needed[site])
        return cache[site]

    def _plan(self) -> None:
        """For each site, the union of slots read there, and where each reader's slots sit."""
        wanted: dict[int, list[Tensor]] = {}
        for e in self.edges.values():
            for ce in e.channels:
                wanted.setdefault(ce.channel.read_site, []).append(ce.slots)
        for layer, heads in self.qk.items():
            for p in heads.values():
                wanted.setdefault(self.layout.head_site(layer), [])
                wanted[self.layout.head_site(layer)] += [p.q_slots, p.k_slots]
        self._needed = {site: torch.unique(torch.cat(v)) for site, v in wanted.items()}
        self._where: dict[int, Tensor] = {}
        for site, v in wanted.items():
            for slots in v:
                self._where[id(slots)] = torch.searchsorted(self._needed[site], slots)

    def _columns(self, trace: Trace, site: int, slots: Tensor) -> Tensor:
        return self._site_columns(trace, site)[..., self._where[id(slots)]]

    def gated(
        self, trace: Trace, channel: Channel, slots: Tensor, cols: Tensor | None = None
    ) -> Tensor:
        """``G_c``: source activations as the channel delivers them to a target position."""
        if cols is None:
            cols = self.source_columns(trace, channel.read_site, slots)
        if channel.kind == "direct":
            return cols
        bias = slots == self.layout.space(channel.read_site).size
        if channel.kind == "skip":
            gated = cols / trace.s2[channel.layer][..., None]
        else:
            scaled = cols / trace.s1[channel.layer][..., None]
            gated = trace.pattern[channel.layer][:, channel.head] @ scaled
        gated[..., bias] = 1.0  # the channel bias is not scaled, and attention sums to one
        return gated

    def _edge_preacts(self, trace: Trace, layer: int) -> Tensor:
        edges = self.edges[layer]
        total = None
        for ce in edges.channels:
            cols = self._columns(trace, ce.channel.read_site, ce.slots)
            g = self.gated(trace, ce.channel, ce.slots, cols)
            flat = g.reshape(-1, g.shape[-1])
            contrib = (ce.weight @ flat.T).T if ce.weight.is_sparse_csr else flat @ ce.weight.T
            total = contrib if total is None else total + contrib
        B, T = trace.tokens.shape
        if total is None:
            total = torch.zeros(B * T, edges.bias.shape[0], dtype=self.w.W_E.dtype)
        total = total.reshape(B, T, -1)
        return total / trace.s2[layer][..., None] + edges.bias

    def _pair_scores(self, trace: Trace, n1: Tensor, s1: Tensor, layer: int) -> Tensor:
        """Level 3 scores ``[B, H, T, T]`` from kept query-key source pairs (graph nodes only)."""
        site = self.layout.head_site(layer)
        heads = []
        for h in range(self.layout.n_heads):
            p = self.qk[layer][h]
            qa = self._columns(trace, site, p.q_slots) / s1[..., None]
            ka = self._columns(trace, site, p.k_slots) / s1[..., None]
            if p.rotary is not None:
                heads.append(self._rotary_scores(p, qa, ka, n1, layer, h))
                continue
            if p.weight.is_sparse_csr:  # [n_k, n_q]: the transposed pair weights
                B, T, _ = qa.shape
                left = (p.weight @ qa.reshape(B * T, -1).T).T.reshape(B, T, -1)
            else:
                left = qa @ p.weight
            pair = left @ ka.transpose(1, 2)
            key = self.w.keys(layer, h, n1) @ p.query_vec + ka @ p.key_corr
            heads.append(pair + key[:, None, :])
        return torch.stack(heads, 1)

    def _rotary_scores(
        self, p: QKPairs, qa: Tensor, ka: Tensor, n1: Tensor, layer: int, h: int
    ) -> Tensor:
        """:class:`RotaryPairs` scores ``[B, T, T]``, one sequence at a time: per key-side
        source m, ``L_m(t) = Σ_j kept (ã_j(t) − μ_j) q_j`` (one sparse product over
        ``[n_q, T·d_head]``), then both sides rotated elementwise and contracted over (m, d)."""
        r, w = p.rotary, self.w
        B, T, _ = qa.shape
        d = r.k_vecs.shape[1]
        cos, sin = w.rotary_tables(layer, T)

        def rot(x: Tensor) -> Tensor:  # [..., T, d] rotated by position, in place
            flipped = w.rotary_flip(layer, x)
            return x.mul_(cos).addcmul_(flipped, sin)

        queries = w.queries(layer, h, n1) - r.mean_query  # [B, T, d]
        keys = w.keys(layer, h, n1) + r.key_bias
        n_k = len(r.k_vecs)
        out = []
        for b in range(B):
            spread = ((qa[b] - r.q_mean).T[:, :, None] * r.q_vecs[:, None, :]).reshape(-1, T * d)
            score = torch.zeros(T, T, dtype=qa.dtype, device=qa.device)
            for i, kept in enumerate(r.kept):  # chunks of key sources stay in cache
                m0, m1 = i * KEY_CHUNK, min((i + 1) * KEY_CHUNK, n_k)
                left = rot((kept @ spread).reshape(-1, T, d))  # [c, T, d]
                right = ka[b, :, m0:m1].T[:, :, None] * r.k_vecs[m0:m1, None, :]
                right = rot(right)
                score.addmm_(
                    left.transpose(0, 1).reshape(T, -1), right.transpose(0, 1).reshape(T, -1).T
                )
            side_q = rot(torch.stack([p.query_vec.expand(T, d), queries[b]]).clone())  # [2, T, d]
            side_k = rot(torch.stack([keys[b], r.key_bias.expand(T, d)]).clone())
            rest = side_q.transpose(0, 1).reshape(T, -1) @ side_k.transpose(0, 1).reshape(T, -1).T
            out.append(score + rest)
        return torch.stack(out)
