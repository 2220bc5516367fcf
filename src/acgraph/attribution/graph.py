"""`AttributionGraph`: nodes of one prompt's local replacement model and its sparse adjacency.

Node order (the same as circuit-tracer's, so indices and edges compare one to one)::

    [0, F)                 active features, sorted by (layer, position, feature)
    [F, F + L*n)           error nodes, layer-major: F + layer*n + position
    [F + L*n, F + L*n + n) token nodes (embeddings), one per position
    [.., + K)              target nodes (logits, logit differences, or a feature)

The adjacency ``A[target, source]`` (the direct effect of ``source`` on ``target``'s
pre-activation / logit under frozen attention and norm scales) is stored as CSR: row ``r``'s
sources are ``col[crow[r]:crow[r+1]]`` (ascending) with weights ``val[...]``. Only
structurally possible edges are stored (source layer below the target's, source position at or
before it): no dense N x N matrix is ever built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ArtifactError
from acgraph.io import atomic_save_tensors

FORMAT_VERSION = 1
_CHUNK = 1 << 22  # nonzeros per chunk in row-wise sparse loops (bounds temporaries)


@dataclass
class Target:
    """One attribution target: a logit (``vocab_idx`` >= 0), a custom direction, or a feature."""

    label: str
    kind: str  # "logit" | "logit_diff" | "feature"
    layer: int  # n_layers for logit-like targets
    position: int
    weight: float  # probability for logits; influence weight otherwise
    vocab_idx: int = -1
    feature: int = -1


@dataclass
class AttributionGraph:
    tokens: Tensor  # [n] long
    token_strings: list[str]
    n_layers: int
    feat_layer: Tensor  # [F] long
    feat_pos: Tensor  # [F] long
    feat_idx: Tensor  # [F] long
    feat_act: Tensor  # [F] float
    targets: list[Target]
    crow: Tensor  # [N + 1] long
    col: Tensor  # [nnz] int32
    val: Tensor  # [nnz] float32
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ layout

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.feat_layer.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def target_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.target_start + len(self.targets)

    @property
    def nnz(self) -> int:
        return int(self.val.shape[0])

    @property
    def target_weights(self) -> Tensor:
        return torch.tensor([t.weight for t in self.targets], dtype=torch.float32)

    def node_kind(self, node: int) -> str:
        if node < self.error_start:
            return "feature"
        if node < self.token_start:
            return "error"
        if node < self.target_start:
            return "token"
        if node < self.n_nodes:
            return "target"
        raise IndexError(node)

    def node_layer_pos(self, node: int) -> tuple[int, int]:
        """(layer, position) of a node; tokens are layer -1, targets their target layer."""
        kind = self.node_kind(node)
        if kind == "feature":
            return int(self.feat_layer[node]), int(self.feat_pos[node])
        if kind == "error":
            return divmod(node - self.error_start, self.n_pos)
        if kind == "token":
            return -1, node - self.token_start
        t = self.targets[node - self.target_start]
        return t.layer, t.position

    def feature_node(self, layer: int, position: int, feature: int) -> int:
        """Node index of an active feature; ArtifactError when it is not active there."""
        hit = (
            (self.feat_layer == layer) & (self.feat_pos == position) & (self.feat_idx == feature)
        ).nonzero()
        if hit.numel() == 0:
            raise ArtifactError(
                f"feature {feature} of layer {layer} is not active at position {position}"
            )
        return int(hit[0, 0])

    def describe(self, node: int) -> str:
        kind = self.node_kind(node)
        layer, pos = self.node_layer_pos(node)
        if kind == "feature":
            return f"L{layer}/f{int(self.feat_idx[node])}@{pos}"
        if kind == "error":
            return f"err L{layer}@{pos}"
        if kind == "token":
            return f"tok {self.token_strings[pos]!r}@{pos}"
        return f"target {self.targets[node - self.target_start].label!r}"

    # ------------------------------------------------------------ sparse access

    def row(self, node: int) -> tuple[Tensor, Tensor]:
        """(source node indices, weights) of ``node``'s incoming edges."""
        a, b = int(self.crow[node]), int(self.crow[node + 1])
        return self.col[a:b].long(), self.val[a:b]

    def edge(self, target: int, source: int) -> float:
        cols, vals = self.row(target)
        hit = (cols == source).nonzero()
        return float(vals[hit[0, 0]]) if hit.numel() else 0.0

    def row_chunks(self) -> Iterator[tuple[int, int, Tensor]]:
        """(first row, end row, row index per nonzero) over chunks of about _CHUNK nonzeros."""
        n = self.n_nodes
        r = 0
        while r < n:
            start = int(self.crow[r])
            end_row = int(torch.searchsorted(self.crow, start + _CHUNK, right=True)) - 1
            end_row = min(max(end_row, r + 1), n)
            counts = self.crow[r + 1 : end_row + 1] - self.crow[r:end_row]
            rows = torch.repeat_interleave(torch.arange(r, end_row), counts)
            yield r, end_row, rows
            r = end_row

    def dense(self) -> Tensor:
        """The dense adjacency [N, N] (small graphs and tests only)."""
        out = torch.zeros(self.n_nodes, self.n_nodes)
        for _, _, rows in self.row_chunks():
            a, b = int(self.crow[rows[0]]), int(self.crow[rows[-1] + 1])
            out[rows, self.col[a:b].long()] = self.val[a:b]
        return out

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.val))

    # ------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Compact form: one safetensors file (tensors + JSON metadata), written atomically."""
        header = {
            "format": "acgraph.attribution_graph",
            "format_version": FORMAT_VERSION,
            "n_layers": self.n_layers,
            "token_strings": self.token_strings,
            "targets": [asdict(t) for t in self.targets],
            "meta": self.meta,
        }
        tensors = {
            "tokens": self.tokens.long(),
            "feat_layer": self.feat_layer.to(torch.int32),
            "feat_pos": self.feat_pos.to(torch.int32),
            "feat_idx": self.feat_idx.to(torch.int32),
            "feat_act": self.feat_act.float(),
            "crow": self.crow.long(),
            "col": self.col.to(torch.int32),
            "val": self.val.float(),
        }
        return atomic_save_tensors(path, tensors, metadata={"acgraph": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        from safetensors import safe_open

        from acgraph.io import load_tensors

        path = Path(path)
        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("acgraph")
        try:
            header = json.loads(raw or "")
        except json.JSONDecodeError:
            raise ArtifactError(f"{path} is not an acgraph attribution graph") from None
        if header.get("format") != "acgraph.attribution_graph":
            raise ArtifactError(f"{path} is not an acgraph attribution graph")
        if header.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has graph format_version {header.get('format_version')!r}; this "
                f"acgraph reads {FORMAT_VERSION}"
            )
        return cls(
            tokens=tensors["tokens"],
            token_strings=list(header["token_strings"]),
            n_layers=int(header["n_layers"]),
            feat_layer=tensors["feat_layer"].long(),
            feat_pos=tensors["feat_pos"].long(),
            feat_idx=tensors["feat_idx"].long(),
            feat_act=tensors["feat_act"],
            targets=[Target(**t) for t in header["targets"]],
            crow=tensors["crow"],
            col=tensors["col"],
            val=tensors["val"],
            meta=dict(header.get("meta") or {}),
        )
