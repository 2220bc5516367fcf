"""Fitted formulas: choose and refit each feature's k in-edges by least squares (level "2f").

Mean folding keeps a pruned feature's average input, but the dropped edges' variation is lost,
and much of it is correlated with edges that were kept. Here each feature's formula is fitted
(ridge least squares, float64) to predict its level-1 pre-activation from in-edge contributions
``G/s`` on the statistics corpus:

- the candidates are the feature's top ``pool`` ranked edges (``pool >= k``);
- k of them are chosen by greedy forward selection (each step adds the candidate that most
  reduces the residual, given those already chosen), so a candidate that repeats what the
  formula already has (a token through the direct path and again through a head that
  attends to itself) is passed over for one that adds something; ``pool = k`` keeps the top k;
- the chosen edges' weights and the bias are refit.

Layers are fitted in order, each on inputs from the already-fitted graph below it, so a layer
learns to work with the features the pruned graph will actually give it.

**Adaptive fan-in** (``fanin="adaptive"``): a layer gets k·n_features edges in all, not k per
feature. Some features are a sum of a few sources, others (a feature of a word class, read
from every word through the direct path and each head) need many; a fixed k starves the
second kind and wastes edges on the first. Every feature's greedy selection runs to
``max_fanin`` edges, recording each step's drop in squared error; the drops, weighted by the
price of an error in the feature (``importance``: its Fisher information, what an error costs
the output's KL, fisher.py; or ``|W_dec[i]|²``, how far it moves the residual stream), are
made non-increasing along each feature's sequence, and the layer's budget goes to the largest.
Each feature keeps its first edge and the prefix of its greedy order that won. The result is still
"Z = 3·A + 4·B" over sources of the graph; only the coefficients are effective rather than
virtual weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.errors import ConfigError
from acgraph.linalg import solve_spd
from acgraph.progress import progress_bar

from .fisher import fisher_importance
from .forward import ACGModel, LayerEdges
from .prune import RankedEdges, select_edges
from .weights import ModelWeights

#: entries of the per-batch design block [positions, features, pool + 1] built at once
_BLOCK = 32_000_000
#: censored fits: passes that re-target off positions at the current fit (each one more read
#: of the statistics corpus, without the X'X product), and the share of the gap from an off
#: feature's true pre-activation up to its cut that a prediction may move through freely
_CENSOR_PASSES = 2
_CENSOR_MARGIN = 0.5


FANIN = ("fixed", "adaptive")
IMPORTANCE = ("fisher", "decoder")
LOSSES = ("squared", "censored")
#: activations with a value below which a feature is off (:func:`off_ceiling`)
CEILED = ("topk", "relu", "jumprelu", "batchtopk")


@dataclass
class FittedLayer:
    """One layer's fitted formulas: ``index`` (candidate indices as in
    :class:`RankedEdges`), ``weight`` [n_features, K] and ``bias`` [n_features].
    ``n_edges`` [n_features] (adaptive fan-in): feature i uses its first ``n_edges[i]``
    slots, the rest are zero; None: every slot."""

    index: Tensor
    weight: Tensor
    bias: Tensor
    n_edges: Tensor | None = None

    def used(self) -> Tensor:
        """[n_features, K] which slots are edges."""
        slots = torch.arange(self.weight.shape[1])
        if self.n_edges is None:
            return torch.ones(self.weight.shape, dtype=torch.bool)
        return slots[None, :] < self.n_edges[:, None]


def _split(ranked: RankedEdges, idx: Tensor) -> tuple[Tensor, Tensor]:
    """(channel number, slot) of candidate indices."""
    offsets = torch.tensor(ranked.offsets + [10**18])
    chan = torch.bucketize(idx.contiguous(), offsets, right=True) - 1
    return chan, idx - offsets[chan]


def off_ceiling(activation, pre: Tensor) -> Tensor | None:
    """``[..., n_features]``: the value below which a feature stays off, given the true
    pre-activations ``pre`` of the whole row: the k-th largest (at least 0) for TopK, which
    competes within a position; the threshold for JumpReLU and BatchTopK at inference; 0 for
    ReLU. None for an activation with no such value (the censored fit then falls back to
    squared error)."""
    name = getattr(activation, "name", "")
    if name not in CEILED:
        return None
    if name == "topk":
        cut = pre.topk(min(activation.k, pre.shape[-1]), dim=-1).values[..., -1:]
        return cut.clamp(min=0).expand_as(pre)
    if name == "relu":
        return torch.zeros_like(pre)
    return activation.jumprelu_threshold().to(pre).expand_as(pre)  # jumprelu, batchtopk


@torch.no_grad()
def _design_blocks(truth, below, ranked, layer, pool, batches, pad, bar, cut=False):
    """Per statistics batch and block of features: ``(features, x, y, ceiling, on)``, with
    x [block, n, pool + 1] (float64; G/s of the candidate edges at the n valid positions,
    the intercept last), y [n, block] the level-1 pre-activations and, with ``cut``,
    ``ceiling`` [n, block] (:func:`off_ceiling`) and ``on`` [n, block] where level 1 has the
    feature on (else None). ``bar`` advances once per batch."""
    chan, slot = _split(ranked, ranked.index[:, :pool])
    n_feat = chan.shape[0]
    activation = truth.w.transcoders[layer].activation
    for tokens in batches:
        trace = below.run(tokens, until=layer)
        exact = trace if below is truth else truth.run(tokens, until=layer)
        mask = valid_positions(trace.tokens, pad)
        s = trace.s2[layer][mask]
        y = exact.pre[layer][mask]
        ceiling = off_ceiling(activation, y) if cut else None
        on = exact.acts[layer][mask] != 0 if cut else None
        gathered = {}  # channel -> (slots, G/s of those slots at the masked positions)
        for c in chan.unique().tolist():
            slots = torch.unique(slot[chan == c])
            gathered[c] = (slots, below.gated(trace, ranked.channels[c], slots)[mask] / s[:, None])
        n = int(mask.sum())
        step = max(1, _BLOCK // max(1, n * (pool + 1)))
        for lo in range(0, n_feat, step):
            f = slice(lo, min(n_feat, lo + step))
            cols = torch.zeros(n, f.stop - f.start, pool + 1)
            cols[..., pool] = 1.0  # the intercept
            for c, (slots, g) in gathered.items():
                sel = chan[f] == c
                f_i, k_i = sel.nonzero(as_tuple=True)
                cols[:, f_i, k_i] = g[:, torch.searchsorted(slots, slot[f][sel])]
            x = cols.double().transpose(0, 1)  # [features, n, pool + 1]
            if cut:
                yield f, x, y[:, f].double(), ceiling[:, f].double(), on[:, f]
            else:
                yield f, x, y[:, f].double(), None, None
        bar.update()


def _normal_equations(truth, below, ranked, layer, pool, batches, pad, bar):
    """X'X [n_features, pool + 1, pool + 1] and X'y over the statistics corpus."""
    n_feat = ranked.index.shape[0]
    xtx = torch.zeros(n_feat, pool + 1, pool + 1, dtype=torch.float64)
    xty = torch.zeros(n_feat, pool + 1, dtype=torch.float64)
    for f, x, y, _, _ in _design_blocks(truth, below, ranked, layer, pool, batches, pad, bar):
        xtx[f] += x.transpose(1, 2) @ x
        xty[f] += (x.transpose(1, 2) @ y.T[..., None])[..., 0]
    return xtx, xty


def censored_target(y: Tensor, pred: Tensor, ceiling: Tensor, on: Tensor) -> Tensor:
    """The target a censored fit regresses on: the true pre-activation ``y`` where the
    feature is on; where it is off, the prediction itself (no error) while it stays between
    ``y`` and halfway from ``y`` to the ``ceiling`` above which the feature would turn on,
    else the nearer end. How far below the cut an off feature sits changes nothing
    downstream, so the fit need not spend edges reproducing it; the half-gap margin keeps
    predictions from settling just under the cut, where new text would push them over."""
    upper = y + (_CENSOR_MARGIN * (ceiling - y)).clamp(min=0)
    return torch.where(on, y, torch.minimum(torch.maximum(pred, y), upper))


@torch.no_grad()
def _censored_xty(truth, below, ranked, layer, pool, batches, pad, bar, beta):
    """X'y' over the statistics corpus, y' the :func:`censored_target` of the current fit
    ``beta`` [n_features, pool + 1] (dense over the candidates, the intercept last)."""
    xty = torch.zeros(beta.shape, dtype=torch.float64)
    for f, x, y, ceiling, on in _design_blocks(
        truth, below, ranked, layer, pool, batches, pad, bar, cut=True
    ):
        pred = (x @ beta[f, :, None])[..., 0].T  # [n, block]
        target = censored_target(y, pred, ceiling, on)
        xty[f] += (x.transpose(1, 2) @ target.T[..., None])[..., 0]
    return xty


def _regularized(xtx: Tensor, ridge: float) -> Tensor:
    """Ridge penalty relative to each system's mean diagonal, none on the intercept (the
    last column), so scale differences between features do not matter."""
    k1 = xtx.shape[-1]
    penalty = torch.eye(k1, dtype=xtx.dtype)
    penalty[-1, -1] = 0
    scale = xtx.diagonal(dim1=1, dim2=2)[:, :-1].mean(1).clamp(min=1e-12)
    return xtx + ridge * scale[:, None, None] * penalty


def _greedy(a: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Forward selection on normal equations ``a`` [F, P+1, P+1], ``b`` [F, P+1] (last column:
    the intercept, always in): the k candidates [F, k] in the order chosen, and each step's
    drop in squared error [F, k]. Each step adds the candidate with the largest drop,
    ``c² / d``, where ``c`` is its correlation with the current residual and ``d`` its
    variance left after projecting out the columns already chosen.

    Gram–Schmidt in the space the normal equations describe: ``u_i`` [F, P] holds every
    candidate's covariance with the i-th chosen column once the columns before it are
    projected out (scaled to unit variance), so adding a column updates ``c`` and ``d`` in
    O(P·s) per feature instead of re-solving an s×s system."""
    F, P1, _ = a.shape
    P = P1 - 1
    rows = torch.arange(F)
    diag = a.diagonal(dim1=1, dim2=2)[:, :P]
    floor = 1e-12 * diag.mean(1, keepdim=True).clamp(min=1e-30)
    # the intercept is in from the start
    n = a[:, P, P].clamp(min=1e-30)[:, None]
    steps = min(k, P)
    basis = torch.empty(F, steps + 1, P, dtype=a.dtype)  # row i: u_i; row 0: the intercept's
    basis[:, 0] = a[:, :P, P] / n.sqrt()
    c = b[:, :P] - a[:, :P, P] * (b[:, P:P1] / n)
    d = diag - a[:, :P, P].pow(2) / n
    taken = torch.zeros(F, P, dtype=torch.bool)
    picks, drops = [], []
    for s in range(1, steps + 1):
        gain = c.pow(2) / d.clamp(min=floor)
        gain[taken] = -1.0
        drop, pick = gain.max(1)
        picks.append(pick)
        drops.append(drop.clamp(min=0))
        taken[rows, pick] = True
        # covariance of every candidate with the new column, the chosen ones projected out
        u = basis[:, :s]
        e = a[rows, :P, pick] - (u[rows, :, pick][:, None, :] @ u)[:, 0]
        d_p = d[rows, pick].clamp(min=floor[:, 0])[:, None]
        c = c - e * (c[rows, pick][:, None] / d_p)
        d = d - e.pow(2) / d_p
        basis[:, s] = e / d_p.sqrt()
    return torch.stack(picks, 1), torch.stack(drops, 1)


def _allocate(drops: Tensor, importance: Tensor, k: int) -> Tensor:
    """Edges per feature [F] for a layer budget of k·F: every feature's first edge, then the
    largest importance-weighted drops win the rest (drops made non-increasing along each
    feature's greedy order first, so what a feature wins is a prefix of it)."""
    gain = torch.cummin(drops * importance[:, None], 1).values
    gain[:, 0] = torch.inf
    n_feat, cap = gain.shape
    won = gain.flatten().topk(min(k * n_feat, gain.numel())).indices
    return torch.bincount(won // cap, minlength=n_feat)


def _solve_subset(a: Tensor, b: Tensor, picked: Tensor) -> tuple[Tensor, Tensor]:
    """Weights [F, k] of the picked columns and the intercept [F]."""
    F, P1, _ = a.shape
    cols = torch.cat([picked, torch.full((F, 1), P1 - 1, dtype=torch.long)], 1)
    rows = torch.arange(F)[:, None, None]
    beta = solve_spd(a[rows, cols[:, :, None], cols[:, None, :]], torch.gather(b, 1, cols))
    return beta[:, :-1], beta[:, -1]


def _solve_prefixes(a: Tensor, b: Tensor, picked: Tensor, n_edges: Tensor) -> tuple[Tensor, Tensor]:
    """Weights [F, K] (zero beyond each feature's ``n_edges`` prefix of ``picked``) and the
    intercepts [F]; features with equal counts are solved together."""
    w = torch.zeros(picked.shape, dtype=a.dtype)
    bias = torch.zeros(picked.shape[0], dtype=a.dtype)
    for n in n_edges.unique().tolist():
        rows = (n_edges == n).nonzero()[:, 0]
        w[rows, :n], bias[rows] = _solve_subset(a[rows], b[rows], picked[rows, :n])
    return w, bias


def feature_prices(
    weights: ModelWeights,
    batches: Sequence[Tensor],
    importance: str,
    pad_token_id=None,
    progress: bool = False,
) -> dict[int, Tensor]:
    """Per layer [n_features]: what a unit of squared error in each feature costs
    (``importance``: "fisher", fisher.py, or "decoder", ``|W_dec[i]|²``)."""
    if importance not in IMPORTANCE:
        raise ConfigError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    if importance == "fisher":
        return fisher_importance(ACGModel(weights), batches, pad_token_id, progress=progress)
    return {
        layer: tc.W_dec.detach().double().pow(2).sum(1)
        for layer, tc in enumerate(weights.transcoders)
    }


def _select(a: Tensor, b: Tensor, P: int, cap: int, k: int, price: Tensor | None):
    """One layer's formulas from its normal equations: (picked [F, cap] pool positions in
    greedy order, weights, intercepts, n_edges or None); ``price`` [F] given: adaptive
    fan-in."""
    n_feat = a.shape[0]
    if cap < P or price is not None:
        picked, drops = _greedy(a, b, cap)
    else:
        picked, drops = torch.arange(P).expand(n_feat, P), None
    if price is None:
        return (picked, *_solve_subset(a, b, picked), None)
    n_edges = _allocate(drops, price, k)
    return (picked, *_solve_prefixes(a, b, picked, n_edges), n_edges)


def _dense(picked: Tensor, w: Tensor, bias: Tensor, P: int) -> Tensor:
    """[F, P + 1]: the weights over the whole candidate pool, the intercept last."""
    beta = torch.zeros(picked.shape[0], P + 1, dtype=w.dtype)
    beta.scatter_(1, picked, w)
    beta[:, P] = bias
    return beta


@torch.no_grad()
def fit_edges(
    weights: ModelWeights,
    ranked: dict[int, RankedEdges],
    batches: Sequence[Tensor],
    k: int,
    *,
    pool: int | None = None,
    ridge: float = 1e-3,
    fanin: str = "fixed",
    max_fanin: int | None = None,
    importance: str | dict[int, Tensor] = "fisher",
    loss: str = "squared",
    pad_token_id: int | None = None,
    progress: bool = True,
) -> dict[int, FittedLayer]:
    """Fitted formulas per layer: k edges per feature chosen greedily from its top ``pool``
    ranked edges (default: k, the top k themselves), with least-squares weights. With
    ``fanin="adaptive"``, k edges per feature on average over each layer, at most
    ``max_fanin`` (default 4·k) for one feature, chosen from the top max(pool, max_fanin),
    each feature's errors priced by ``importance`` (a name for :func:`feature_prices`, or
    the prices themselves, so fits for several k compute them once). ``loss="censored"``:
    where level 1 has a feature off, only predictions that would turn it on are errors
    (:func:`censored_target`; the selection and weights are fitted again
    ``_CENSOR_PASSES`` times, each on the targets of the fit before)."""
    if fanin not in FANIN:
        raise ConfigError(f"fanin must be one of {FANIN}, got {fanin!r}")
    if isinstance(importance, str) and importance not in IMPORTANCE:
        raise ConfigError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
    prices = importance
    if fanin == "adaptive" and isinstance(importance, str):
        prices = feature_prices(weights, batches, importance, pad_token_id, progress)
    truth = ACGModel(weights)
    fitted: dict[int, FittedLayer] = {}
    edges: dict[int, LayerEdges] = {}
    n_layers = weights.layout.n_layers
    passes = _CENSOR_PASSES if loss == "censored" else 0
    # one tick per (layer, pass over the corpus, batch): the data passes are most of the time
    bar = progress_bar(
        total=n_layers * (1 + passes) * len(batches), desc=f"acg: fit k={k}", enabled=progress
    )
    for layer in range(n_layers):
        r = ranked[layer]
        cap = min(max_fanin or 4 * k, r.max_k) if fanin == "adaptive" else k
        P = min(max(pool or k, cap), r.max_k)
        below = ACGModel(weights, dict(edges)) if edges else truth
        data = (truth, below, r, layer, P, batches, pad_token_id, bar)
        xtx, xty = _normal_equations(*data)
        a = _regularized(xtx, ridge)
        price = prices[layer] if fanin == "adaptive" else None
        picked, w, b, n_edges = _select(a, xty, P, cap, k, price)
        # an activation with no cut to censor at keeps its squared-error fit
        cut = getattr(weights.transcoders[layer].activation, "name", "") in CEILED
        bar.update(0 if cut else passes * len(batches))
        for _ in range(passes if cut else 0):
            xty = _censored_xty(*data, _dense(picked, w, b, P))
            picked, w, b, n_edges = _select(a, xty, P, cap, k, price)
        index = torch.gather(r.index[:, :P], 1, picked)
        fitted[layer] = FittedLayer(index.contiguous(), w.float().contiguous(), b.float(), n_edges)
        edges[layer] = fitted_layer_edges(weights, r, layer, fitted[layer])
    bar.close()
    return fitted


def fitted_layer_edges(
    weights: ModelWeights, ranked: RankedEdges, layer: int, fit: FittedLayer
) -> LayerEdges:
    """A layer's fitted formulas as kept edges (its own bias, nothing folded)."""
    k = fit.weight.shape[1]
    swapped = RankedEdges(
        ranked.channels,
        ranked.offsets,
        fit.index,
        fit.weight,
        torch.zeros_like(fit.weight),
        torch.zeros_like(fit.weight),
        torch.zeros_like(fit.bias),
    )
    edges = select_edges(weights, swapped, layer, k)
    edges.bias = fit.bias
    return edges
