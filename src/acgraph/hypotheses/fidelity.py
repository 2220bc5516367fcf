"""Local fidelity: how well a hypothesis reproduces its target's values on held-out data,
given the true upstream values.

Features: Pearson correlation, FVU, precision and recall of firing (value > 0). Patterns: FVU of
the attention weights, the attention mass both put on the same keys (1 - total variation), and
agreement of the most-attended key. Components: FVU of the output vectors. Sums are streamed in
float64 over every non-padding position after BOS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core import Target


class FidelitySums:
    def __init__(self, target: Target):
        self.target = target
        self.n = 0
        self.sy = self.syy = self.sp = self.spp = self.syp = self.sse = 0.0
        self.sy_dim: Tensor | None = None  # components: per-dimension sums for the variance
        self.syy_dim: Tensor | None = None
        self.tp = self.fp = self.fn = 0
        self.rows = 0
        self.overlap = self.argmax = 0.0

    def update(self, truth: Tensor, pred: Tensor, mask: Tensor) -> None:
        """``mask`` ``[B, T]``: the positions scored (queries, for patterns)."""
        kind = self.target.kind
        if kind == "pattern":
            self._update_pattern(truth, pred, mask)
            return
        y, p = truth[mask].double(), pred[mask].double()
        if kind == "feature":
            self.n += y.numel()
            self.sy += float(y.sum())
            self.syy += float((y * y).sum())
            self.sp += float(p.sum())
            self.spp += float((p * p).sum())
            self.syp += float((y * p).sum())
            self.sse += float(((y - p) ** 2).sum())
            fy, fp = y > 0, p > 0
            self.tp += int((fy & fp).sum())
            self.fp += int((~fy & fp).sum())
            self.fn += int((fy & ~fp).sum())
        else:
            self.n += y.shape[0]
            self.sse += float(((y - p) ** 2).sum())
            sy, syy = y.sum(0), (y * y).sum(0)
            self.sy_dim = sy if self.sy_dim is None else self.sy_dim + sy
            self.syy_dim = syy if self.syy_dim is None else self.syy_dim + syy

    def _update_pattern(self, truth: Tensor, pred: Tensor, mask: Tensor) -> None:
        T = truth.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=truth.device).tril()
        rows_t, rows_p = truth[mask].double(), pred[mask].double()  # [n_rows, T]
        qpos = torch.nonzero(mask)[:, 1]
        keep = causal[qpos]  # each query's keys
        y, p = rows_t[keep], rows_p[keep]
        self.n += y.numel()
        self.sy += float(y.sum())
        self.syy += float((y * y).sum())
        self.sse += float(((y - p) ** 2).sum())
        self.rows += rows_t.shape[0]
        self.overlap += float(torch.minimum(rows_t, rows_p).sum())
        self.argmax += float((rows_t.argmax(-1) == rows_p.argmax(-1)).sum())

    def result(self) -> dict[str, Any]:
        n = max(self.n, 1)
        if self.target.kind == "mlp" or self.target.kind == "attn":
            var = float((self.syy_dim - self.sy_dim**2 / n).sum()) if self.sy_dim is not None else 0
            return {"fvu": _fvu(self.sse, var), "mse": self.sse / n, "n": self.n}
        var = self.syy - self.sy**2 / n
        out: dict[str, Any] = {"fvu": _fvu(self.sse, var), "mse": self.sse / n, "n": self.n}
        if self.target.kind == "pattern":
            rows = max(self.rows, 1)
            out["mass_overlap"] = self.overlap / rows
            out["argmax_agreement"] = self.argmax / rows
            return out
        var_p = self.spp - self.sp**2 / n
        cov = self.syp - self.sy * self.sp / n
        out["corr"] = cov / (var * var_p) ** 0.5 if var > 1e-12 and var_p > 1e-12 else None
        out["firing_rate"] = (self.tp + self.fn) / n
        out["precision"] = self.tp / (self.tp + self.fp) if self.tp + self.fp else None
        out["recall"] = self.tp / (self.tp + self.fn) if self.tp + self.fn else None
        return out


def _fvu(sse: float, var: float) -> float:
    """SSE over the target's variance; a constant target is matched (0) or not (1)."""
    if var <= 1e-12:
        return 0.0 if sse <= 1e-9 else 1.0
    return sse / var
