"""Where every node of the ACG lives: residual *sites*, source *groups* and *channels*.

Sites number the points where something reads the residual stream of a pre-norm transformer:
site ``2l`` is ``resid_pre`` of layer ``l`` (read by its attention heads), ``2l + 1`` is
``resid_mid`` (read by its MLP transcoder) and ``2L`` is the final residual (read by the
unembedding).

A *group* is a block of scalar source nodes that write a fixed vector each into the residual
stream from some site on (ACG.md §1): token and position embeddings, one ``const`` node (the sum
of every bias written so far), one ``bos`` node (the whole residual at a leading BOS, which no
input can change), each layer's head outputs (one node per head dimension, vector = a row of
``W_O``), its transcoder features (vector = a decoder row) and its skip path (one node per output
dimension).

A *channel* is a way a source reaches a target feature: ``direct`` through the residual stream, or
through one linear map that reads the residual and writes it back: a head's OV circuit (gated by
the attention pattern) or a transcoder's skip matrix. Every in-edge of a feature is a (channel,
source) pair; the sources of a channel are the nodes visible at the site it reads, plus one
channel-bias slot (the head's value bias, which attention passes through unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from acgraph.errors import ArtifactError

GROUP_KINDS = ("tok", "pos", "const", "bos", "heads", "feats", "skip")
#: groups that reach a target only through a channel, never directly (heads and skips are
#: themselves expanded into channels; ``bos`` is only active at position 0, never a target)
INDIRECT_KINDS = ("heads", "skip", "bos")


@dataclass(frozen=True)
class Group:
    kind: str
    layer: int  # the layer that writes it (-1 for embeddings, const and bos)
    size: int
    write_site: int

    @property
    def name(self) -> str:
        return self.kind if self.layer < 0 else f"{self.kind}{self.layer}"


@dataclass(frozen=True)
class Channel:
    kind: str  # "direct" | "head" | "skip"
    layer: int  # the layer of the head / skip; the target layer for "direct"
    head: int = -1
    read_site: int = 0

    @property
    def name(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        if self.kind == "skip":
            return f"skip{self.layer}"
        return "direct"

    @property
    def has_bias(self) -> bool:
        return self.kind == "head"


@dataclass
class SiteSpace:
    """The source nodes visible at one site, laid out as one index space."""

    site: int
    groups: list[Group]
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets, n = [], 0
        for g in self.groups:
            self.offsets.append(n)
            n += g.size
        self.size = n

    def locate(self, index: int) -> tuple[Group, int]:
        for g, off in zip(self.groups, self.offsets, strict=True):
            if off <= index < off + g.size:
                return g, index - off
        raise IndexError(f"source index {index} outside site {self.site} (size {self.size})")

    def slice(self, name: str) -> slice:
        for g, off in zip(self.groups, self.offsets, strict=True):
            if g.name == name:
                return slice(off, off + g.size)
        raise KeyError(name)


@dataclass
class Layout:
    """Sites, groups and channels of one model + transcoder set (graph layers ``0..n_layers-1``)."""

    n_layers: int  # layers replaced by the graph
    n_model_layers: int
    d_vocab: int
    n_ctx: int
    n_heads: int
    d_head: int
    d_sae: list[int]
    has_pos: bool
    has_skip: list[bool]

    def __post_init__(self) -> None:
        groups = [Group("tok", -1, self.d_vocab, 0)]
        if self.has_pos:
            groups.append(Group("pos", -1, self.n_ctx, 0))
        groups += [Group("const", -1, 1, 0), Group("bos", -1, 1, 0)]
        for layer in range(self.n_layers):
            groups.append(Group("heads", layer, self.n_heads * self.d_head, 2 * layer + 1))
            groups.append(Group("feats", layer, self.d_sae[layer], 2 * layer + 2))
            if self.has_skip[layer]:
                groups.append(Group("skip", layer, self.d_model_out, 2 * layer + 2))
        self.groups = groups
        self._spaces: dict[int, SiteSpace] = {}

    # d_model is only needed for skip groups; set by from_model
    d_model_out: int = 0

    @classmethod
    def from_model(cls, model: Any, transcoders: dict[int, Any]) -> Layout:
        cfg = model.cfg
        n = len(transcoders)
        if sorted(transcoders) != list(range(n)) or n == 0:
            raise ArtifactError(
                "the ACG needs transcoders for a contiguous range of layers starting at 0, got "
                f"layers {sorted(transcoders)}"
            )
        if n > cfg.n_layers:
            raise ArtifactError(f"transcoders for {n} layers but the model has {cfg.n_layers}")
        layout = cls(
            n_layers=n,
            n_model_layers=cfg.n_layers,
            d_vocab=cfg.d_vocab,
            n_ctx=cfg.n_ctx,
            n_heads=cfg.n_heads,
            d_head=cfg.d_head,
            d_sae=[transcoders[i].d_sae for i in range(n)],
            has_pos=cfg.positional_embedding_type == "standard",
            has_skip=[transcoders[i].W_skip is not None for i in range(n)],
            d_model_out=cfg.d_model,
        )
        return layout

    # ------------------------------------------------------------------ sites

    @staticmethod
    def head_site(layer: int) -> int:
        return 2 * layer

    @staticmethod
    def mlp_site(layer: int) -> int:
        return 2 * layer + 1

    def space(self, site: int) -> SiteSpace:
        if site not in self._spaces:
            self._spaces[site] = SiteSpace(site, [g for g in self.groups if g.write_site <= site])
        return self._spaces[site]

    def channels(self, target_layer: int) -> list[Channel]:
        """Every channel into the features of ``target_layer``, ``direct`` first."""
        out = [Channel("direct", target_layer, read_site=self.mlp_site(target_layer))]
        for layer in range(target_layer + 1):
            out += [Channel("head", layer, h, self.head_site(layer)) for h in range(self.n_heads)]
            if layer < target_layer and self.has_skip[layer]:
                out.append(Channel("skip", layer, read_site=self.mlp_site(layer)))
        return out

    def channel_size(self, channel: Channel) -> int:
        """Candidate slots of a channel: the sources at its read site, plus the bias slot."""
        return self.space(channel.read_site).size + 1

    # ------------------------------------------------------------------ labels

    def source_label(self, site: int, index: int, tokens: list[str] | None = None) -> str:
        space = self.space(site)
        if index == space.size:
            return "bias"
        g, i = space.locate(index)
        if g.kind == "tok":
            return f"tok({tokens[i]!r})" if tokens is not None else f"tok#{i}"
        if g.kind == "pos":
            return f"pos({i})"
        if g.kind in ("const", "bos"):
            return g.kind
        if g.kind == "heads":
            return f"L{g.layer}H{i // self.d_head}.z{i % self.d_head}"
        if g.kind == "feats":
            return f"L{g.layer}/{i}"
        return f"skip{g.layer}.{i}"

    def describe(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "n_model_layers": self.n_model_layers,
            "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "d_sae": self.d_sae,
            "has_pos": self.has_pos,
            "has_skip": self.has_skip,
            "d_model": self.d_model_out,
        }
