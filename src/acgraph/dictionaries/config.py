"""`DictionaryConfig`: what one sparse dictionary is (shape, hooks, activation, loss settings).

Kinds:

``sae``
    reads hook X and reconstructs hook X (``hooks_out == [hook_in]``).
``transcoder``
    reads hook X and predicts hook Y (e.g. ``blocks.L.ln2.hook_normalized`` ->
    ``blocks.L.hook_mlp_out``).
``skip_transcoder``
    a transcoder with an extra linear ``W_skip`` (zero-initialized).

Output hooks are a list (``hooks_out``) so a cross-layer transcoder (one encoder, one decoder per
later layer) can be added as a new kind without changing the config or the file formats.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from acgraph.errors import ConfigError

KINDS = ("sae", "transcoder", "skip_transcoder")
ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
AUX_K_NORMALIZATIONS = ("residual", "output")


@dataclass
class DictionaryConfig:
    """Everything needed to build (and train) one :class:`SparseDictionary`."""

    kind: str
    d_in: int
    d_sae: int
    hook_in: str
    hooks_out: list[str] = field(default_factory=list)  # empty: [hook_in] (an SAE)
    d_out: int | None = None  # None: d_in
    activation: str = "topk"
    k: int | None = 32  # TopK / BatchTopK
    name: str | None = None  # folder name; default: the output hook (transcoders) / hook_in
    apply_b_dec_to_input: bool = False  # SAELens convention, SAEs only: encode(x - b_dec)
    normalize_decoder: bool | None = None  # None: True for topk/batchtopk
    # losses
    l1_coefficient: float = 1e-3  # relu: L1 of activations times decoder-row norms
    l0_coefficient: float = 1e-3  # jumprelu: STE L0
    sparsity_warmup_steps: int = 0  # linear warmup of the l1/l0 coefficient
    # None: set from the data when training starts (0.1 and 0.05 x the std of the initial
    # pre-activations); 1e-3 for a dictionary built without data
    jumprelu_init_threshold: float | None = None
    jumprelu_bandwidth: float | None = None
    aux_k: bool | None = None  # None: on for topk/batchtopk
    k_aux: int | None = None  # None: d_in // 2
    aux_k_coefficient: float = 1 / 32
    # what the AuxK error is divided by: "residual" (the variance of the main reconstruction's
    # residual, as in sparsify: the dead latents keep a signal of order 1 however good the main
    # reconstruction is) or "output" (the output hook's variance, the main loss's scale)
    aux_k_normalization: str = "residual"
    dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
    # every this many steps (0: never), dead latents are re-initialized on the batch's worst
    # reconstructed tokens (encoder: the token's centred input direction; decoder: its
    # residual direction; fresh optimizer moments), during the first `resample_until` of training
    resample_every: int = 0
    resample_until: float = 0.5
    batchtopk_threshold_decay: float = 0.99  # EMA of the batch's smallest kept activation
    # provenance (written to cfg.json metadata)
    model_name: str | None = None
    context_size: int | None = None
    prepend_bos: bool = True
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown dictionary kind {self.kind!r} (choose from {KINDS})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r} (choose from {ACTIVATIONS})")
        for attr in ("d_in", "d_sae"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{attr} must be a positive integer, got {value!r}")
        if not isinstance(self.hook_in, str) or not self.hook_in:
            raise ConfigError("hook_in must be a non-empty hook name")
        if isinstance(self.hooks_out, str):
            self.hooks_out = [self.hooks_out]
        self.hooks_out = list(self.hooks_out)
        if self.kind == "sae":
            if self.hooks_out and self.hooks_out != [self.hook_in]:
                raise ConfigError(
                    f"an SAE reconstructs its input hook; got hook_in={self.hook_in!r}, "
                    f"hooks_out={self.hooks_out!r} (use kind='transcoder')"
                )
            self.hooks_out = [self.hook_in]
            if self.d_out is not None and self.d_out != self.d_in:
                raise ConfigError(f"an SAE has d_out == d_in; got {self.d_out} != {self.d_in}")
        elif len(self.hooks_out) != 1:
            raise ConfigError(
                f"a {self.kind} predicts exactly one output hook, got {self.hooks_out!r}"
            )
        if self.d_out is None:
            self.d_out = self.d_in
        if self.apply_b_dec_to_input and (self.kind != "sae" or self.d_out != self.d_in):
            raise ConfigError("apply_b_dec_to_input is only valid for SAEs (d_out == d_in)")
        if self.activation in ("topk", "batchtopk"):
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise ConfigError(f"{self.activation} needs a positive integer k, got {self.k!r}")
            if self.k > self.d_sae:
                raise ConfigError(f"k={self.k} exceeds the dictionary width d_sae={self.d_sae}")
        if self.normalize_decoder is None:
            self.normalize_decoder = self.activation in ("topk", "batchtopk")
        if self.aux_k is None:
            self.aux_k = self.activation in ("topk", "batchtopk")
        if isinstance(self.resample_every, bool) or not isinstance(self.resample_every, int):
            raise ConfigError(f"resample_every must be an integer, got {self.resample_every!r}")
        if self.resample_every < 0 or not 0 <= self.resample_until <= 1:
            raise ConfigError("resample_every must be >= 0 and resample_until in [0, 1]")
        if self.aux_k_normalization not in AUX_K_NORMALIZATIONS:
            raise ConfigError(
                f"aux_k_normalization must be one of {AUX_K_NORMALIZATIONS}, "
                f"got {self.aux_k_normalization!r}"
            )
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)
        if self.name is None:
            self.name = self.hooks_out[0] if self.kind != "sae" else self.hook_in
        if "/" in self.name or self.name in ("", ".", ".."):
            raise ConfigError(f"dictionary name {self.name!r} is not a valid folder name")

    # ------------------------------------------------------------ conveniences

    @property
    def hook_out(self) -> str:
        """The single output hook (every kind so far has exactly one)."""
        return self.hooks_out[0]

    @property
    def has_skip(self) -> bool:
        return self.kind == "skip_transcoder"

    @property
    def is_transcoder(self) -> bool:
        return self.kind in ("transcoder", "skip_transcoder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown dictionary config fields: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> DictionaryConfig:
        return dataclasses.replace(self, **changes)
