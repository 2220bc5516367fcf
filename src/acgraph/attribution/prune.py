"""Influence, pruning and graph scores on the sparse adjacency (circuit-tracer's definitions).

- Row-normalize |A| (each target's incoming weights sum to 1): Â.
- Influence of every node on the targets: w Â + w Â² + ... (w = target weights, e.g. logit
  probabilities); the graph is a DAG, so the series ends after at most n_layers + 2 terms.
- Pruning keeps the nodes carrying ``node_threshold`` of the cumulative influence (tokens and
  targets always), then the edges carrying ``edge_threshold`` of the edge influence of the
  node-pruned graph, then drops nodes left without outgoing (features/errors) or incoming
  (features) edges until nothing changes.
- Replacement score = token influence / (token + error influence); completeness score =
  influence-weighted share of each node's normalized inputs that do not come from errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.errors import ConfigError

from .graph import AttributionGraph


@dataclass
class PruneResult:
    node_mask: Tensor  # [N] bool
    edge_mask: Tensor  # [nnz] bool, aligned with graph.val
    cumulative_scores: Tensor  # [N] cumulative influence share in descending order (0..1)
    node_influence: Tensor  # [N]

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())


def _row_sums(graph: AttributionGraph, values: Tensor) -> Tensor:
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    return (csum[graph.crow[1:]] - csum[graph.crow[:-1]]).float()


def normalized(graph: AttributionGraph, values: Tensor | None = None) -> Tensor:
    """|A| with every row scaled to sum to 1 (empty rows stay empty)."""
    a = (graph.val if values is None else values).abs()
    sums = _row_sums(graph, a).clamp(min=1e-10)
    out = torch.empty_like(a)
    for r0, r1, rows in graph.row_chunks():
        lo, hi = int(graph.crow[r0]), int(graph.crow[r1])
        out[lo:hi] = a[lo:hi] / sums[rows]
    return out


def vec_mat(graph: AttributionGraph, w: Tensor, values: Tensor) -> Tensor:
    """``w @ A`` for the CSR pattern of ``graph`` with ``values``."""
    out = torch.zeros(graph.n_nodes, dtype=torch.float32)
    for r0, r1, rows in graph.row_chunks():
        lo, hi = int(graph.crow[r0]), int(graph.crow[r1])
        wr = w[rows]
        nz = wr != 0
        if nz.any():
            out.index_add_(0, graph.col[lo:hi][nz].long(), (values[lo:hi] * wr)[nz])
    return out


def influence(graph: AttributionGraph, norm_values: Tensor, weights: Tensor) -> Tensor:
    """Σ_k w Âᵏ (k >= 1) for the row-normalized values ``norm_values``."""
    cur = vec_mat(graph, weights, norm_values)
    total = cur.clone()
    for _ in range(graph.n_layers + 4):
        if not cur.any():
            return total
        cur = vec_mat(graph, cur, norm_values)
        total += cur
    if cur.any():
        raise RuntimeError("influence did not converge: the adjacency is not a DAG")
    return total


def target_weights(graph: AttributionGraph) -> Tensor:
    w = torch.zeros(graph.n_nodes)
    w[graph.target_start :] = graph.target_weights
    return w


def node_influence(graph: AttributionGraph) -> Tensor:
    return influence(graph, normalized(graph), target_weights(graph))


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The score above which ``threshold`` of the total score lies (circuit-tracer's rule)."""
    s = torch.sort(scores, descending=True).values
    if s.numel() == 0:
        return torch.tensor(float("inf"))
    cum = s.double().cumsum(0) / s.double().sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=torch.float64))), len(s) - 1)
    return s[i]


def prune(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PruneResult:
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], got {t}")
    w = target_weights(graph)
    infl = influence(graph, normalized(graph), w)
    node_mask = infl >= find_threshold(infl, node_threshold)
    node_mask[graph.token_start :] = True  # tokens and targets always stay
    rows_all = _rows(graph)
    cols = graph.col.long()
    keep = node_mask[rows_all] & node_mask[cols]
    pruned_vals = torch.where(keep, graph.val, torch.zeros_like(graph.val))
    norm_p = normalized(graph, pruned_vals)
    infl_p = influence(graph, norm_p, w) + w
    scores = norm_p * infl_p[rows_all]
    nonzero = scores[scores > 0]
    edge_mask = (scores >= find_threshold(nonzero, edge_threshold)) & (scores > 0)
    inner = graph.token_start  # features and errors
    n_feat = graph.n_features
    while True:
        old = node_mask.clone()
        edge_mask &= node_mask[rows_all] & node_mask[cols]
        has_out = torch.zeros(graph.n_nodes, dtype=torch.bool)
        has_out[cols[edge_mask]] = True
        has_in = torch.zeros(graph.n_nodes, dtype=torch.bool)
        has_in[rows_all[edge_mask]] = True
        node_mask[:inner] &= has_out[:inner]
        node_mask[:n_feat] &= has_in[:n_feat]
        if torch.equal(old, node_mask):
            break
    order = torch.sort(infl, descending=True)
    cum = order.values.double().cumsum(0) / order.values.double().sum().clamp(min=1e-30)
    cumulative = torch.zeros_like(infl)
    cumulative[order.indices] = cum.float()
    return PruneResult(node_mask, edge_mask, cumulative, infl)


def _rows(graph: AttributionGraph) -> Tensor:
    return torch.repeat_interleave(
        torch.arange(graph.n_nodes, dtype=torch.int32), graph.crow.diff()
    ).long()


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """(replacement score, completeness score)."""
    w = target_weights(graph)
    norm = normalized(graph)
    infl = influence(graph, norm, w)
    tok = infl[graph.token_start : graph.target_start].sum()
    err = infl[graph.error_start : graph.token_start].sum()
    replacement = float(tok / (tok + err).clamp(min=1e-30))
    is_err = (graph.col.long() >= graph.error_start) & (graph.col.long() < graph.token_start)
    err_share = _row_sums(graph, torch.where(is_err, norm, torch.zeros_like(norm)))
    out_infl = infl + w
    completeness = float(((1 - err_share) * out_infl).sum() / out_infl.sum().clamp(min=1e-30))
    return replacement, completeness
