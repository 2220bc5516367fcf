"""`attribute()`: the exact local attribution graph of one prompt.

1. Real forward pass (:func:`~.frozen.capture`): attention patterns, norm scales, transcoder
   inputs and MLP outputs. Feature activations come from the transcoders; error = true MLP
   output - reconstruction. Position 0 (the BOS) has no feature or error nodes, as in
   circuit-tracer: its huge, prompt-independent activations would swamp everything.
2. Targets (:mod:`.targets`): top logits to 95% probability (at most 10), demeaned over the
   vocabulary; or logit differences / a feature.
3. Backward sweeps over batches of targets in node order through the explicit transposed
   Jacobians (:class:`~.frozen.LinearizedModel`), contracting the gradient at each MLP output
   with that layer's source vectors (activation x decoder row, error vector) and at the
   embedding with the token embeddings. Each batch keeps only positions up to its last target
   position, and each row only its structurally possible sources, written straight into a CSR
   allocated once up front (its row sizes are known before any backward pass).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.errors import ConfigError
from acgraph.progress import progress_bar

from .frozen import Capture, LinearizedModel, capture
from .graph import AttributionGraph, Target
from .targets import TargetSpec, make_targets
from .transcoders import TranscoderSet, load_transcoders

# elements of one [positions, rows, Fmax] feature-contraction product (bounds the temporary)
_CONTRACT_ELEMS = 1 << 18


@dataclass
class Sources:
    """Source vectors by layer in the padded layout used by the contraction."""

    feat_layer: Tensor
    feat_pos: Tensor
    feat_idx: Tensor
    feat_act: Tensor
    pad_vecs: list[Tensor]  # per layer [n, Fmax, d] (activation x decoder row; 0 in pads)
    pad_cols: list[Tensor]  # per layer [n, Fmax] node index, -1 in pads
    errors: Tensor  # [L, n, d]


def tokenize(model, prompt: str | list[int] | Tensor) -> Tensor:
    """Token ids [n] with BOS prepended (strings); ids are used as given (lists, tensors)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("empty prompt")
        if model.tokenizer is None:
            raise ConfigError("this model has no tokenizer: pass token ids")
        tokens = model.to_tokens(prompt, prepend_bos=True)[0]
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    if tokens.numel() < 2:
        raise ConfigError("a prompt needs at least 2 tokens (BOS and one more)")
    vocab = model.cfg.d_vocab
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ConfigError(f"token ids must lie in [0, {vocab})")
    if model.cfg.positional_embedding_type == "standard" and tokens.numel() > model.cfg.n_ctx:
        raise ConfigError(
            f"prompt has {tokens.numel()} tokens; this model's context is {model.cfg.n_ctx}"
        )
    return tokens.to(model.cfg.device)


@torch.no_grad()
def active_sources(
    ts: TranscoderSet, cap: Capture, zero_first_position: bool = True
) -> tuple[Sources, Tensor]:
    """Active features (sorted by layer, position, feature), padded source vectors, errors.

    Returns (sources, reconstructions [L, n, d])."""
    L, n, _ = cap.tc_in.shape
    layers, poss, idxs, acts, vecs, cols, recons = [], [], [], [], [], [], []
    offset = 0
    for i in range(L):
        d = ts[i]
        a = d.encode(cap.tc_in[i])  # [n, d_sae]
        if zero_first_position:
            a[0] = 0
        recons.append(d.decode(a, cap.tc_in[i]))
        pos, feat = a.nonzero(as_tuple=True)  # row-major: sorted by (pos, feature)
        val = a[pos, feat]
        counts = torch.bincount(pos, minlength=n)
        fmax = int(counts.max()) if pos.numel() else 0
        slot = torch.arange(pos.numel(), device=a.device) - (counts.cumsum(0) - counts)[pos]
        pv = torch.zeros(n, fmax, d.d_out, device=a.device, dtype=a.dtype)
        pc = torch.full((n, fmax), -1, dtype=torch.long, device=a.device)
        pv[pos, slot] = val[:, None] * d.W_dec.detach()[feat]
        pc[pos, slot] = torch.arange(pos.numel(), device=a.device) + offset
        offset += pos.numel()
        layers.append(torch.full_like(pos, i))
        poss.append(pos)
        idxs.append(feat)
        acts.append(val)
        vecs.append(pv)
        cols.append(pc)
    recon = torch.stack(recons)
    errors = cap.mlp_out - recon
    if zero_first_position:
        errors[:, 0] = 0
    src = Sources(
        feat_layer=torch.cat(layers),
        feat_pos=torch.cat(poss),
        feat_idx=torch.cat(idxs),
        feat_act=torch.cat(acts),
        pad_vecs=vecs,
        pad_cols=cols,
        errors=errors,
    )
    return src, recon


def attribute(
    model,
    transcoders,
    prompt: str | list[int] | Tensor,
    *,
    targets: list[TargetSpec] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 64,
    zero_first_position: bool = True,
    verbose: bool = False,
) -> AttributionGraph:
    """The unpruned attribution graph of ``prompt`` (see the module doc).

    ``transcoders``: anything :func:`~.transcoders.load_transcoders` accepts. ``targets``:
    None (salient logits) or a list of target specs (:mod:`.targets`). ``batch_size``: backward
    rows per batch; 64 is faster and lighter than 256 on CPU at every length we measured
    (docs/benchmarks.md, Attribution); larger batches may suit a GPU.
    """
    t0 = time.perf_counter()
    ts = load_transcoders(transcoders, model)
    tokens = tokenize(model, prompt)
    cap = capture(model, ts, tokens)
    lin = LinearizedModel(model, ts, cap)
    src, _ = active_sources(ts, cap, zero_first_position)
    tgt_list, seeds = make_targets(
        model, ts, cap, lin, src, targets, max_n_logits, desired_logit_prob
    )
    graph = _assemble(model, ts, cap, lin, src, tgt_list, seeds, batch_size, verbose)
    graph.meta.update(
        {
            "model": model.cfg.model_name,
            "transcoders": ts.name,
            "zero_first_position": zero_first_position,
            "seconds": time.perf_counter() - t0,
        }
    )
    return graph


def _assemble(
    model,
    ts: TranscoderSet,
    cap: Capture,
    lin: LinearizedModel,
    src: Sources,
    tgt_list: list[Target],
    seeds: Tensor,
    batch_size: int,
    verbose: bool,
) -> AttributionGraph:
    """Rows for every feature (in node order) and then every target."""
    L, n = lin.n_layers, int(cap.tokens.shape[0])
    F = int(src.feat_layer.shape[0])
    err0, tok0 = F, F + L * n
    # Row descriptors: (layer, position, seed vector in resid_mid space, or resid_post of the
    # last layer for layer == L). Features first (node order), then targets.
    dev = cap.tc_in.device
    row_layer = torch.cat([src.feat_layer, torch.tensor([t.layer for t in tgt_list], device=dev)])
    row_pos = torch.cat([src.feat_pos, torch.tensor([t.position for t in tgt_list], device=dev)])
    n_rows = row_layer.shape[0]

    # Allocated once and filled batch by batch: concatenating per-batch pieces at the end held
    # the whole adjacency twice.
    counts = _row_counts(src, row_layer, row_pos, L, n).cpu()
    crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    col = torch.empty(int(crow[-1]), dtype=torch.int32)
    val = torch.empty(int(crow[-1]), dtype=torch.float32)
    bar = progress_bar(total=n_rows, desc="attribution", unit="row", enabled=verbose)
    for start in range(0, n_rows, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_rows), device=dev)
        b_layer, b_pos = row_layer[rows], row_pos[rows]
        m = int(b_pos.max()) + 1
        top = int(b_layer.max())
        B = rows.shape[0]
        g = torch.zeros(B, m, lin.W_E.shape[1], device=dev, dtype=cap.tc_in.dtype)
        blocks_f: list[Tensor] = []
        blocks_e: list[Tensor] = []
        cols_f: list[Tensor] = []
        cols_e: list[Tensor] = []
        lay_f: list[Tensor] = []
        lay_e: list[Tensor] = []
        pos_f: list[Tensor] = []
        pos_e: list[Tensor] = []
        # targets living at the final residual (layer == L): seed before the first block
        _seed(g, rows, b_layer, b_pos, L, src, seeds, lin, F)
        for layer in range(min(top, L - 1), -1, -1):
            if layer < top:
                _contract(
                    g,
                    layer,
                    m,
                    n,
                    err0,
                    src,
                    blocks_f,
                    cols_f,
                    lay_f,
                    pos_f,
                    blocks_e,
                    cols_e,
                    lay_e,
                    pos_e,
                )
            # g is this loop's own buffer: the backward steps overwrite it
            g = lin.skip_back(layer, g, inplace=True)
            _seed(g, rows, b_layer, b_pos, layer, src, seeds, lin, F)
            g = lin.attn_back(layer, g, inplace=True)
        tok_vecs = lin.W_E[cap.tokens[:m]]
        blocks_t = torch.einsum("bmd,md->bm", g, tok_vecs)
        del g
        # columns in node order: features by layer (ascending), errors by layer, tokens
        vals = torch.cat([*blocks_f[::-1], *blocks_e[::-1], blocks_t], dim=1)
        del blocks_f, blocks_e, blocks_t
        cols = torch.cat([*cols_f[::-1], *cols_e[::-1], tok0 + torch.arange(m, device=dev)])
        c_layer = torch.cat([*lay_f[::-1], *lay_e[::-1], torch.full((m,), -1, device=dev)])
        c_pos = torch.cat([*pos_f[::-1], *pos_e[::-1], torch.arange(m, device=dev)])
        mask = c_layer[None] < b_layer[:, None]
        mask &= c_pos[None] <= b_pos[:, None]
        lo, hi = int(crow[start]), int(crow[start + B])
        if int(mask.sum()) != hi - lo:  # the up-front count and the mask must agree
            raise RuntimeError("attribution: row sizes disagree with the precomputed CSR")
        cols = cols.to(torch.int32)
        if vals.device.type == "cpu" and vals.dtype == torch.float32:
            # straight into the CSR slices (no [nnz]-sized temporaries; cols broadcast over rows)
            torch.masked_select(vals, mask, out=val[lo:hi])
            torch.masked_select(cols, mask, out=col[lo:hi])
        else:
            val[lo:hi] = vals[mask].float().cpu()
            col[lo:hi] = cols.expand(B, -1)[mask].cpu()
        del vals, mask
        bar.update(B)
    bar.close()
    # error and token rows have no incoming edges: insert empty rows between features/targets
    feat_crow, tgt_crow = crow[: F + 1], crow[F + 1 :]
    empty = torch.full((L * n + n,), int(feat_crow[-1]), dtype=torch.long)
    full_crow = torch.cat([feat_crow, empty, tgt_crow])
    tok_strings = _token_strings(model, cap.tokens)
    return AttributionGraph(
        tokens=cap.tokens.cpu(),
        token_strings=tok_strings,
        n_layers=L,
        feat_layer=src.feat_layer.cpu(),
        feat_pos=src.feat_pos.cpu(),
        feat_idx=src.feat_idx.cpu(),
        feat_act=src.feat_act.float().cpu(),
        targets=tgt_list,
        crow=full_crow,
        col=col,
        val=val,
        meta={},
    )


def _row_counts(src: Sources, row_layer: Tensor, row_pos: Tensor, L: int, n: int) -> Tensor:
    """Sources of each row: features and errors of earlier layers at positions <= its position,
    and the tokens up to it."""
    hist = torch.zeros(L + 1, n, dtype=torch.long, device=row_layer.device)
    hist.index_put_((src.feat_layer + 1, src.feat_pos), torch.ones_like(src.feat_pos), True)
    below = hist.cumsum(0).cumsum(1)  # below[l, p]: features in layers < l at positions <= p
    return below[row_layer, row_pos] + (row_layer + 1) * (row_pos + 1)


def _contract(
    g, layer, m, n, err0, src, blocks_f, cols_f, lay_f, pos_f, blocks_e, cols_e, lay_e, pos_e
) -> None:
    """Edges from ``layer``'s sources: ``g`` is the gradient at resid_post[layer]."""
    B, dev = g.shape[0], g.device
    pv, pc = src.pad_vecs[layer][:m], src.pad_cols[layer][:m]
    fmax = pc.shape[1]
    if fmax:
        # [m, B, Fmax] products are mostly padding when one position has many more active
        # features than the rest: a few positions at a time (each position's product is its
        # own matmul either way), keeping only the real (position, slot) pairs, in node order
        step = max(1, _CONTRACT_ELEMS // (B * fmax))
        parts = []
        for p0 in range(0, m, step):
            e = torch.bmm(g[:, p0 : p0 + step].transpose(0, 1), pv[p0 : p0 + step].transpose(1, 2))
            p, s = (pc[p0 : p0 + step] >= 0).nonzero(as_tuple=True)
            parts.append(e.transpose(0, 1)[:, p, s])  # [B, kept]
            del e
        blocks_f.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        del parts
        p, s = (pc >= 0).nonzero(as_tuple=True)
        cols_f.append(pc[p, s])
        lay_f.append(torch.full((p.shape[0],), layer, device=dev))
        pos_f.append(p)
    blocks_e.append(torch.einsum("bmd,md->bm", g, src.errors[layer, :m]))
    cols_e.append(err0 + layer * n + torch.arange(m, device=dev))
    lay_e.append(torch.full((m,), layer, device=dev))
    pos_e.append(torch.arange(m, device=dev))


def _seed(
    g: Tensor,
    rows: Tensor,
    b_layer: Tensor,
    b_pos: Tensor,
    layer: int,
    src: Sources,
    seeds: Tensor,
    lin: LinearizedModel,
    F: int,
) -> None:
    """Add the seed gradients of this batch's rows whose target sits at ``layer``."""
    sel = (b_layer == layer).nonzero(as_tuple=True)[0]
    if sel.numel() == 0:
        return
    r, p = rows[sel], b_pos[sel]
    is_feat = r < F
    if is_feat.any():
        fr = r[is_feat]
        enc = src_encoders(lin, src, fr, layer)
        g[sel[is_feat], p[is_feat]] += lin.tc_input_to_mid(layer, p[is_feat], enc)
    if (~is_feat).any():
        g[sel[~is_feat], p[~is_feat]] += seeds[r[~is_feat] - F]


def src_encoders(lin: LinearizedModel, src: Sources, feat_rows: Tensor, layer: int) -> Tensor:
    return lin.ts_enc[layer][:, src.feat_idx[feat_rows]].T


def _token_strings(model, tokens: Tensor) -> list[str]:
    tok = model.tokenizer
    if tok is None:
        return [str(int(t)) for t in tokens]
    return [tok.decode([int(t)]) for t in tokens]
