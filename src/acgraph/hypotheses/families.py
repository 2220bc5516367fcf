"""Built-in hypothesis families, fitted automatically and written out as editable Python.

Features (each family is fitted on one part of the contexts and chosen on the rest by FVU):
  dead      never fires on the fitting data: always 0
  token     a value per current token ("fires on these tokens")
  ngram     a value per (previous token, token) pair, backing off to a value per token
  position  a value per position
  linear    JumpReLU of a sparse linear formula over upstream features and current-token
            indicators, read directly or as an upstream head moves them; the terms are the
            feature's strongest in-edges in the graph (virtual weight x source spread), their
            weights refitted by least squares
Heads: a non-negative mixture (least squares) of previous token, fixed offsets, same token,
induction and attend-to-BOS patterns, scored by the attention mass it shares with the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from acgraph.linalg import solve_spd
from acgraph.progress import progress_bar

from .core import Context, Target
from .swap import View, run_model

FEATURE_FAMILIES = ("token", "ngram", "position", "linear")
MAX_ENTRIES = 48  # table entries kept per fitted hypothesis (readability)


@dataclass
class Fitted:
    target: Target
    family: str
    params: dict[str, Any]
    fvu: float  # on the validation contexts (heads: 1 - mass overlap)
    alternatives: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- data


@dataclass
class Data:
    tokens: Tensor  # [C, T]
    views: list[View]
    fit_ctx: Tensor  # [C] bool: a fitting context (else validation)
    mask: Tensor  # [C, T] scored positions

    @property
    def fit_rows(self) -> Tensor:
        """[N] bool: the scored position comes from a fitting context."""
        return self.fit_ctx[:, None].expand_as(self.mask)[self.mask]

    def rows(self, x: Tensor) -> Tensor:
        """``[C, T, ...]`` -> ``[N, ...]`` scored positions."""
        return x[self.mask]


def collect(subject: Any, batches: Sequence[Tensor], val_fraction: float = 0.25) -> Data:
    views = [run_model(subject.model, subject.transcoders, t) for t in batches]
    tokens = torch.cat(list(batches))
    mask = torch.cat([subject.mask(t) for t in batches])
    n_val = max(1, round(len(tokens) * val_fraction))
    fit_ctx = torch.arange(len(tokens)) < len(tokens) - n_val
    return Data(tokens, views, fit_ctx, mask)


def _cat(views: list[View], get) -> Tensor:
    return torch.cat([get(v) for v in views])


# ---------------------------------------------------------------- features


def _fvu(y: Tensor, p: Tensor) -> Tensor:
    """Per-column FVU ``[F]`` (a constant column: 0 if matched, else 1)."""
    y, p = y.double(), p.double()
    sse = ((y - p) ** 2).sum(0)
    var = ((y - y.mean(0)) ** 2).sum(0)
    out = sse / var.clamp_min(1e-12)
    const = var <= 1e-12
    out[const] = (sse[const] > 1e-9).double()
    return out


def _table_family(
    keys_fit: Tensor, keys_val: Tensor, y_fit: Tensor, n_keys: int, floor: Tensor | None = None
):
    """Mean value per key, keeping each feature's ``MAX_ENTRIES`` keys of largest total mass
    and dropping entries under 2% of the feature's largest (or under ``floor`` ``[F]``).
    Returns (sparse tables as (keys [F, E], values [F, E]), validation predictions)."""
    F_ = y_fit.shape[1]
    sums = torch.zeros(n_keys, F_, dtype=torch.float64).index_add_(0, keys_fit, y_fit.double())
    count = torch.zeros(n_keys, dtype=torch.float64).index_add_(
        0, keys_fit, torch.ones_like(keys_fit, dtype=torch.float64)
    )
    mean = sums / count.clamp_min(1)[:, None]
    e = min(MAX_ENTRIES, n_keys)
    top = sums.abs().topk(e, dim=0).indices  # [E, F]: largest total mass
    vals = mean.gather(0, top)
    # tiny entries are noise that makes the code unreadable
    cut = 0.02 * vals.abs().amax(0, keepdim=True)
    if floor is not None:
        cut = torch.maximum(cut, floor.double()[None])
    vals[vals.abs() < cut] = 0
    dense = torch.zeros(n_keys, F_, dtype=torch.float64).scatter_(0, top, vals)
    return (top.T, vals.T.float()), dense[keys_val].float()


def fit_features(
    data: Data, subject: Any, layer: int, k: int = 8, families=FEATURE_FAMILIES
) -> list[Fitted]:
    views = data.views
    acts = data.rows(_cat(views, lambda v: v.acts[layer]))  # [N, F]
    fit, val = data.fit_rows, ~data.fit_rows
    cur = data.rows(data.tokens)
    prev = data.rows(torch.cat([torch.zeros_like(data.tokens[:, :1]), data.tokens[:, :-1]], 1))
    pos = data.rows(torch.arange(data.tokens.shape[1]).expand_as(data.tokens))
    V = int(data.tokens.max()) + 1
    F_ = acts.shape[1]
    y_fit, y_val = acts[fit], acts[val]
    preds: dict[str, Tensor] = {}
    params: dict[str, Any] = {}
    if "token" in families:
        params["token"], preds["token"] = _table_family(cur[fit], cur[val], y_fit, V)
    if "ngram" in families:
        _, tok_fit = _table_family(cur[fit], cur[fit], y_fit, V)  # the backoff, on fitting rows
        tok_tab, tok_val = _table_family(cur[fit], cur[val], y_fit, V)
        key = prev * V + cur
        floor = 0.05 * y_fit.abs().amax(0)  # corrections under 5% of the feature's range: noise
        gram_tab, gram_val = _table_family(key[fit], key[val], y_fit - tok_fit, V * V, floor)
        params["ngram"], preds["ngram"] = (tok_tab, gram_tab), tok_val + gram_val
    if "position" in families:
        T = data.tokens.shape[1]
        params["position"], preds["position"] = _table_family(pos[fit], pos[val], y_fit, T)
    if "linear" in families:
        params["linear"], preds["linear"] = _fit_linear(data, subject, layer, acts, k)
    scores = {name: _fvu(y_val, p) for name, p in preds.items()}
    dead = (y_fit.abs().amax(0) == 0).tolist()
    out = []
    for i in range(F_):
        t = Target("feature", layer, i)
        if dead[i]:
            out.append(Fitted(t, "dead", {}, float(_fvu(y_val[:, i : i + 1], y_val[:, :1] * 0))))
            continue
        alts = {name: float(s[i]) for name, s in scores.items()}
        best = min(alts, key=alts.get)
        out.append(Fitted(t, best, _params_of(best, params[best], i, V), alts[best], alts))
    return out


def _params_of(family: str, p: Any, i: int, V: int) -> dict[str, Any]:
    if family == "linear":
        return {
            key: val[i].tolist() if isinstance(val, Tensor) else val[i] for key, val in p.items()
        }
    if family == "ngram":
        grams = _params_of("token", p[1], i, V)["table"]
        return {
            "table": _params_of("token", p[0], i, V)["table"],
            "grams": {(kk // V, kk % V): v for kk, v in grams.items()},
        }
    keys, vals = p[0][i].tolist(), p[1][i].tolist()
    return {"table": {kk: v for kk, v in zip(keys, vals, strict=True) if v != 0}}


TOKENS = -1  # source "layer" of the current-token indicators


def _candidates(subject: Any, layer: int) -> list[tuple[int | None, int | None, int]]:
    """Upstream source channels of a layer-``layer`` feature: (head layer, head, source), the
    source being a feature layer or ``TOKENS``; ``(None, None, j)`` reads it directly."""
    H = subject.model.cfg.n_heads
    out: list[tuple[int | None, int | None, int]] = [(None, None, j) for j in range(-1, layer)]
    for m in range(layer + 1):
        out += [(m, h, j) for h in range(H) for j in range(-1, m)]
    return out


def _channel_values(data: Data, chan: tuple[int | None, int | None, int]) -> Tensor:
    m, h, j = chan
    if j == TOKENS:
        V = int(data.tokens.max()) + 1
        source = [torch.nn.functional.one_hot(v.tokens, V).float() for v in data.views]
    else:
        source = [v.acts[j] for v in data.views]
    if m is None:
        return data.rows(torch.cat(source))
    moved = [v.pattern[m][:, h] @ src for v, src in zip(data.views, source, strict=True)]
    return data.rows(torch.cat(moved))


def _virtual(
    subject: Any, layer: int, chan: tuple[int | None, int | None, int], n_tokens: int
) -> Tensor:
    """Input-independent weights ``[n_source, F_target]`` of one channel (norm scales left
    out: the least-squares fit absorbs their typical size)."""
    model, tcs = subject.model, subject.transcoders
    m, h, j = chan
    dec = model.W_E.detach()[:n_tokens] if j == TOKENS else tcs[j].W_dec.detach()  # [n, d]
    if m is not None:
        blk = model.blocks[m]
        ov = (blk.ln1.w.detach()[:, None] * blk.attn.W_V[h].detach()) @ blk.attn.W_O[h].detach()
        dec = dec @ ov
    enc = model.blocks[layer].ln2.w.detach()[:, None] * tcs[layer].W_enc.detach()  # [d, F]
    return dec @ enc


def _fit_linear(data: Data, subject: Any, layer: int, y: Tensor, k: int):
    chans = _candidates(subject, layer)
    n_tokens = int(data.tokens.max()) + 1
    cols, scores = [], []
    for chan in chans:
        vals = _channel_values(data, chan)  # [N, n_source]
        w = _virtual(subject, layer, chan, n_tokens)  # [n_source, F]
        cols.append(vals)
        scores.append(w.abs() * vals[data.fit_rows].std(0)[:, None])
    X = torch.cat(cols, 1)  # [N, C]
    S = torch.cat(scores, 0)  # [C, F]
    k = min(k, X.shape[1])
    top = S.topk(k, dim=0).indices.T  # [F, k]
    fit = data.fit_rows
    Xf = torch.cat([X[fit][:, top], torch.ones(int(fit.sum()), top.shape[0], 1)], -1)  # [N, F, k+1]
    Xf = Xf.transpose(0, 1).double()  # [F, N, k+1]
    yf = y[fit].T.double()[..., None]  # [F, N, 1]
    gram = Xf.transpose(1, 2) @ Xf
    ridge = 1e-4 * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None].clamp_min(1e-8)
    coef = solve_spd(gram + ridge * torch.eye(k + 1, dtype=gram.dtype), Xf.transpose(1, 2) @ yf)
    coef = coef[..., 0].float()  # [F, k+1]
    pre_fit = (Xf.float() @ coef[..., None])[..., 0].T  # [N_fit, F]
    theta = _best_threshold(pre_fit, y[fit])
    Xv = torch.cat([X[~fit][:, top], torch.ones(int((~fit).sum()), top.shape[0], 1)], -1)
    pre_val = (Xv * coef[None]).sum(-1)
    pred = torch.where(pre_val > theta, pre_val, torch.zeros_like(pre_val))
    sizes = [n_tokens if c[2] == TOKENS else subject.transcoders[c[2]].d_sae for c in chans]
    names = [_chan_name(chans, sizes, int(c)) for c in top.flatten()]
    terms = [names[i * k : (i + 1) * k] for i in range(top.shape[0])]
    return {"terms": terms, "weights": coef[:, :k], "bias": coef[:, k], "threshold": theta}, pred


def _chan_name(chans: list, sizes: list[int], col: int) -> tuple:
    for c, n in zip(chans, sizes, strict=True):
        if col < n:
            return (c[0], c[1], c[2], col)
        col -= n
    raise IndexError(col)


def _best_threshold(pre: Tensor, y: Tensor) -> Tensor:
    """Per feature, the JumpReLU threshold (from a grid of quantiles of ``pre``, and 0) with
    the least squared error."""
    qs = torch.tensor([0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995])
    grid = torch.cat([torch.zeros(1, pre.shape[1]), pre.quantile(qs, dim=0).clamp_min(0)], 0)
    best = None
    for th in grid:
        err = ((torch.where(pre > th, pre, torch.zeros_like(pre)) - y) ** 2).sum(0)
        if best is None:
            best, arg = err, th.clone()
        else:
            better = err < best
            best = torch.where(better, err, best)
            arg = torch.where(better, th, arg)
    return arg


# ---------------------------------------------------------------- heads


def fit_heads(data: Data, subject: Any, layer: int, max_offset: int = 4) -> list[Fitted]:
    """Each head as a non-negative mixture of the pattern families (weights by least squares
    on the fitting contexts, dropping families with little weight)."""
    vocab = subject.vocab
    parts: dict[str, list[Tensor]] = {}
    for view in data.views:
        ctx = Context(view, vocab, Target("pattern", layer, 0))
        fams = {f"offset{d}": ctx.offset(d) for d in range(max_offset + 1)}
        fams.update(same_token=ctx.same_token(), induction=ctx.induction(), bos=ctx.bos())
        for name, p in fams.items():
            parts.setdefault(name, []).append(p)
    names = list(parts)
    fam = torch.stack([torch.cat(parts[n]) for n in names])  # [n_fam, C, T, T]
    truth = torch.cat([v.pattern[layer] for v in data.views])  # [C, H, T, T]
    fit_m = data.mask & data.fit_ctx[:, None]
    val_m = data.mask & ~data.fit_ctx[:, None]
    X = fam[:, fit_m].flatten(1).double()  # [n_fam, rows * T]
    gram = X @ X.T
    out = []
    for h in range(truth.shape[1]):
        y = truth[:, h]
        w = _nnls(gram, X @ y[fit_m].flatten().double())
        w[w < 0.05 * w.sum()] = 0
        w = w / w.sum() if w.sum() > 0 else torch.ones_like(w) / len(w)
        pred = torch.einsum("f,fctu->ctu", w.float(), fam)
        pred = pred / pred.sum(-1, keepdim=True)
        overlap = float(torch.minimum(y, pred)[val_m].sum(-1).mean())
        mix = {n: round(float(x), 4) for n, x in zip(names, w, strict=True) if x > 0}
        main = max(mix, key=mix.get)
        family = {"offset1": "previous_token"}.get(main, main)
        family = "offset" if family.startswith("offset") else family
        best = Fitted(Target("pattern", layer, h), family, {"mix": mix}, 1 - overlap)
        keyed = _fit_keyed(data, y, vocab, layer, h)
        best.alternatives = {"mixture": best.fvu, "keyed": keyed.fvu}
        if keyed.fvu < best.fvu:
            keyed.alternatives = best.alternatives
            best = keyed
        out.append(best)
    return out


def _fit_keyed(
    data: Data, y: Tensor, vocab: dict[str, int], layer: int, head: int, far: int = 12
) -> Fitted:
    """Attention ∝ exp(score of the key's token + score of the distance), fitted by
    cross-entropy against the real pattern; small token scores are then dropped."""
    tokens = data.tokens
    T = tokens.shape[1]
    V = int(tokens.max()) + 1
    q = torch.arange(T)
    dist = (q[:, None] - q[None, :]).clamp(0, far)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    fit_m = data.mask & data.fit_ctx[:, None]

    def pattern(key: Tensor, off: Tensor) -> Tensor:
        scores = key[tokens][:, None, :] + off[dist][None]
        return torch.log_softmax(scores.masked_fill(~causal, float("-inf")), -1)

    key = torch.zeros(V, requires_grad=True)
    off = torch.zeros(far + 1, requires_grad=True)
    opt = torch.optim.Adam([key, off], lr=0.2)
    target = y[fit_m]
    with torch.enable_grad():
        for _ in range(120):
            opt.zero_grad()
            logp = pattern(key, off)[fit_m]
            loss = -(target * logp.clamp_min(-1e4)).sum(-1).mean()
            loss.backward()
            opt.step()
    key, off = key.detach(), off.detach()
    seen = torch.zeros(V, dtype=torch.bool)
    seen[tokens[data.fit_ctx].unique()] = True
    key = torch.where(seen, key - key[seen].median(), torch.zeros_like(key))
    key[key.abs() < 0.25] = 0  # readability: only tokens that shift attention noticeably
    pred = pattern(key, off).exp()
    val_m = data.mask & ~data.fit_ctx[:, None]
    overlap = float(torch.minimum(y, pred)[val_m].sum(-1).mean())
    names = {i: t for t, i in vocab.items()}
    params = {
        "keys": {names[i]: round(float(v), 3) for i, v in enumerate(key) if v != 0},
        "offsets": {d: round(float(v), 3) for d, v in enumerate(off)},
    }
    return Fitted(Target("pattern", layer, head), "keyed", params, 1 - overlap)


def _nnls(gram: Tensor, rhs: Tensor, iters: int = 50) -> Tensor:
    """Non-negative least squares on the normal equations (active set: re-solve on the
    families whose weights stay positive)."""
    active = torch.ones(len(rhs), dtype=torch.bool)
    w = torch.zeros_like(rhs)
    for _ in range(iters):
        idx = active.nonzero()[:, 0]
        if len(idx) == 0:
            break
        sub = gram[idx][:, idx] + 1e-9 * torch.eye(len(idx), dtype=gram.dtype)
        sol = torch.linalg.solve(sub, rhs[idx])
        if bool((sol >= 0).all()):
            w = torch.zeros_like(rhs)
            w[idx] = sol
            break
        active[idx[sol.argmin()]] = False
    return w


# ---------------------------------------------------------------- everything


def fit_all(
    subject: Any,
    batches: Sequence[Tensor],
    *,
    layers: Sequence[int] | None = None,
    k: int = 8,
    families: Sequence[str] = FEATURE_FAMILIES,
    heads: bool = True,
    progress: bool = True,
) -> list[Fitted]:
    """The best built-in hypothesis for every feature and head of ``layers`` (default all)."""
    with torch.no_grad():
        data = collect(subject, batches)
        layers = list(range(len(subject.transcoders))) if layers is None else list(layers)
        out: list[Fitted] = []
        for layer in progress_bar(layers, desc="hypotheses: fit", enabled=progress):
            if heads:
                out += fit_heads(data, subject, layer)
            out += fit_features(data, subject, layer, k, tuple(families))
    return out
