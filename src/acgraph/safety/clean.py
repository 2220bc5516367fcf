"""Remove behaviour trusted data never uses by running the model through a graph built from
trusted data only (`acg clean`).

The method sees a model and a trusted corpus, nothing else: no trigger, no payload, no poisoned
text (:func:`clean` has no parameter through which one could arrive). Steps:

1. transcoders trained on the trusted corpus (``acg train --corpus ...``), optionally fine-tuned
   end to end on the same corpus (``finetune_steps``: acgraph.dictionaries.finetune), to match
   the model's next-token distribution rather than each MLP in isolation;
2. run the level-1 ACG over the trusted corpus and record each feature's usage: how often it
   fires and the largest activation it reaches (:func:`feature_usage`);
3. keep a feature only where trusted data uses it (fires on at least ``min_frequency`` of
   positions) and cap its activation at what trusted data reaches (``ceiling`` x the trusted
   maximum): computation that only an untrusted input would drive is cut or bounded;
4. optionally refine the kept features end to end on the same trusted corpus;
5. bound attention (graph/attention_bounds.py): per head, a key token in its context (the
   token after it, or before it) gets no more weight than trusted data ever gave it (or a
   floor any pair may reach): a head that looks somewhere trusted text never made it look is
   cut back to BOS (``cap``), or such keys are masked out before the softmax (``mask``);
6. the runnable ACG of what is kept. Its TopK activations are written as calibrated JumpReLUs
   (thresholds from trusted data), so the cleaned graph compiles exactly (see compile.py);
   the attention bounds do not compile into GPT-2 attention and stay in the ACG.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.dictionaries import capped
from acgraph.dictionaries.capped import CappedActivation
from acgraph.errors import ConfigError
from acgraph.graph.attention_bounds import KINDS, MODES, attention_peaks

from .compile import calibrate_thresholds, derive_transcoder


@dataclass(frozen=True)
class CleanConfig:
    min_frequency: float = 1e-4  # keep features firing on at least this fraction of positions
    ceiling: float | None = 1.0  # cap activations at ceiling x trusted max (None: no cap)
    jumprelu: bool = True  # write TopK as calibrated JumpReLU (compiles exactly)
    # MLP inputs (encoder and skip) restricted to the directions that carry all but this
    # fraction of the trusted inputs' energy (None: no restriction)
    drop_energy: float | None = 1e-4
    finetune_steps: int = 0  # KL steps of every feature toward the model, before the cuts
    finetune_lr: float = 3e-4
    refine_steps: int = 0  # KL steps of the kept features toward the model, after the cuts
    refine_lr: float = 1e-4
    # attention on a token pair capped at max(trusted peak, floor) (None: no bounds)
    attention_floor: float | None = 0.1
    attention_kind: str = "key-bigram"  # or key-previous, query-key (graph/attention_bounds.py)
    attention_mode: str = "cap"  # or "mask": unseen/below-floor keys get -inf before softmax

    def validate(self) -> None:
        if not 0.0 <= self.min_frequency < 1.0:
            raise ConfigError(f"min_frequency must be in [0, 1), got {self.min_frequency}")
        if self.drop_energy is not None and not 0.0 <= self.drop_energy < 1.0:
            raise ConfigError(f"drop_energy must be in [0, 1), got {self.drop_energy}")
        if self.ceiling is not None and self.ceiling <= 0:
            raise ConfigError(f"ceiling must be positive, got {self.ceiling}")
        for name in ("finetune_steps", "refine_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.attention_floor is not None and not 0.0 <= self.attention_floor <= 1.0:
            raise ConfigError(f"attention_floor must be in [0, 1], got {self.attention_floor}")
        if self.attention_kind not in KINDS:
            raise ConfigError(
                f"attention_kind must be one of {', '.join(KINDS)}, got {self.attention_kind!r}"
            )
        if self.attention_mode not in MODES:
            raise ConfigError(
                f"attention_mode must be one of {', '.join(MODES)}, got {self.attention_mode!r}"
            )


@dataclass
class FeatureUsage:
    """Per-feature statistics of one layer over the trusted corpus."""

    frequency: Tensor  # [d_sae] fraction of positions where the feature is active
    max_act: Tensor  # [d_sae] largest activation seen
    mean_act: Tensor  # [d_sae] mean activation (zeros included)
    positions: int


@dataclass
class CleanResult:
    acg: Any  # ACGModel
    transcoders: dict[int, Any]
    keep: dict[int, Tensor]
    usage: dict[int, FeatureUsage]
    config: CleanConfig
    info: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def input_subspaces(
    acg: Any, batches: Iterable[Tensor], drop_energy: float, pad_token_id: int | None = 0
) -> dict[int, Tensor]:
    """Per layer, the projector onto the directions of the MLP input (the normalized residual
    the transcoder reads) that hold all but ``drop_energy`` of its second moment on
    ``batches``: directions trusted data leaves empty get no say in any feature."""
    moments: dict[int, Tensor] = {}
    for tokens in batches:
        trace = acg.run(tokens, keep_resid=True)
        mask = valid_positions(trace.tokens, pad_token_id)
        for layer in range(acg.layout.n_layers):
            x = trace.resid[2 * layer + 1]
            n = (acg.w.center(x) / acg.w.scale(x)[..., None])[mask].double()
            moments[layer] = moments.get(layer, 0) + n.T @ n
    out = {}
    for layer, m in moments.items():
        vals, vecs = torch.linalg.eigh(m)  # ascending
        cum = vals.clamp(min=0).cumsum(0) / vals.clamp(min=0).sum()
        dropped = int((cum <= drop_energy).sum())
        v = vecs[:, dropped:]
        out[layer] = (v @ v.T).float()
    return out


@torch.no_grad()
def feature_usage(
    acg: Any, batches: Iterable[Tensor], pad_token_id: int | None = 0
) -> dict[int, FeatureUsage]:
    """How the level-1 ACG's features are used on ``batches`` (non-BOS, non-pad positions)."""
    count: dict[int, Tensor] = {}
    peak: dict[int, Tensor] = {}
    total: dict[int, Tensor] = {}
    n = 0
    for tokens in batches:
        trace = acg.run(tokens)
        mask = valid_positions(trace.tokens, pad_token_id)
        n += int(mask.sum())
        for layer, acts in enumerate(trace.acts):
            a = acts[mask].double()
            count[layer] = count.get(layer, 0) + (a > 0).sum(0)
            total[layer] = total.get(layer, 0) + a.sum(0)
            m = a.max(0).values if a.numel() else torch.zeros(a.shape[1], dtype=a.dtype)
            peak[layer] = m if layer not in peak else torch.maximum(peak[layer], m)
    if n == 0:
        raise ConfigError("the trusted corpus gave no positions to measure feature usage on")
    return {
        layer: FeatureUsage(
            (count[layer] / n).float(), peak[layer].float(), (total[layer] / n).float(), n
        )
        for layer in count
    }


def _kl_train(model: Any, transcoders: dict[int, Any], trusted, steps: int, lr: float) -> dict:
    """End-to-end KL training of ``transcoders`` in place on trusted text; its summary."""
    from acgraph.dictionaries.finetune import finetune_end_to_end

    kl = finetune_end_to_end(model, transcoders, trusted, steps=steps, lr=lr)
    return {"steps": steps, "kl_first": kl[0], "kl_last": kl[-1]}


def clean(
    model: Any,
    transcoders: dict[int, Any],
    trusted: Sequence[Tensor],
    config: CleanConfig | None = None,
    wide_trusted: Sequence[Tensor] | None = None,
) -> CleanResult:
    """The cleaned runnable ACG of ``model`` from ``transcoders`` (trained on trusted data)
    and ``trusted`` token batches (each row starting with BOS). ``wide_trusted`` (default:
    ``trusted``) is more of the same trusted corpus for the attention bounds, which need many
    token pairs seen and only one cheap pass. Nothing else is an input."""
    from acgraph.graph.forward import ACGModel
    from acgraph.graph.weights import ModelWeights

    config = config or CleanConfig()
    config.validate()
    if not trusted:
        raise ConfigError("clean needs at least one batch of trusted tokens")
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    info: dict[str, Any] = {}
    if config.finetune_steps:  # on copies: the caller's transcoders stay as given
        transcoders = {i: copy.deepcopy(tc) for i, tc in transcoders.items()}
        info["finetune"] = _kl_train(
            model, transcoders, trusted, config.finetune_steps, config.finetune_lr
        )
    full = ACGModel(ModelWeights(model, dict(transcoders), bos))  # bounds measured afresh
    usage = feature_usage(full, trusted, pad)
    thresholds = calibrate_thresholds(full, trusted, pad) if config.jumprelu else {}
    projectors = (
        input_subspaces(full, trusted, config.drop_energy, pad)
        if config.drop_energy is not None
        else {}
    )
    keep: dict[int, Tensor] = {}
    cleaned: dict[int, Any] = {}
    for layer, tc in transcoders.items():
        u = usage[layer]
        keep[layer] = u.frequency >= config.min_frequency
        if not bool(keep[layer].any()):  # keep at least the most used feature
            keep[layer][u.frequency.argmax()] = True
        theta = thresholds.get(layer) if tc.cfg.activation != "relu" else None
        new = derive_transcoder(tc, keep=keep[layer], threshold=theta)
        if layer in projectors:
            P = projectors[layer].to(new.W_enc)
            with torch.no_grad():
                new.W_enc.copy_(P @ new.W_enc)
                if new.W_skip is not None:
                    new.W_skip.copy_(new.W_skip @ P)
        if config.ceiling is not None:
            new.activation = CappedActivation(
                new.activation, (u.max_act[keep[layer]] * config.ceiling).to(new.W_enc)
            )
        cleaned[layer] = new
    if config.refine_steps:
        info["refine"] = _kl_train(model, cleaned, trusted, config.refine_steps, config.refine_lr)
    bounds = None
    if config.attention_floor is not None:
        unbounded = ACGModel(ModelWeights(model, cleaned, bos))
        bounds = attention_peaks(
            unbounded,
            wide_trusted or trusted,
            config.attention_floor,
            pad,
            config.attention_kind,
            config.attention_mode,
        )
        info["attention_pairs_seen"] = len(bounds.pairs)
    acg = ACGModel(ModelWeights(model, cleaned, bos, bounds))
    info |= {
        "features": {str(i): int(transcoders[i].d_sae) for i in transcoders},
        "kept": {str(i): int(k.sum()) for i, k in keep.items()},
        "trusted_positions": next(iter(usage.values())).positions,
        "min_frequency": config.min_frequency,
        "ceiling": config.ceiling,
        "jumprelu": config.jumprelu,
        "drop_energy": config.drop_energy,
        "input_rank": {str(i): round(float(P.trace())) for i, P in projectors.items()},
        "attention_floor": config.attention_floor,
        "attention_kind": config.attention_kind if config.attention_floor is not None else None,
        "attention_mode": config.attention_mode if config.attention_floor is not None else None,
    }
    return CleanResult(acg, cleaned, keep, usage, config, info)


# ---------------------------------------------------------------- files

CLEAN_REPORT = "clean.json"


def save_cleaned(result: CleanResult, folder: str | Path, report: dict[str, Any]) -> Path:
    """A capped transcoder set (:mod:`acgraph.dictionaries.capped`) plus ``clean.json`` (the
    report); every command that takes ``--transcoders`` reads the folder back."""
    from acgraph.dictionaries.formats import save_dictionary
    from acgraph.io import atomic_write_json

    folder = Path(folder).expanduser()
    for tc in result.transcoders.values():
        save_dictionary(tc, folder / capped.SUBFOLDER / tc.cfg.hook_out)
    capped.save_ceilings(result.transcoders.values(), folder)
    bounds = result.acg.w.attention_bounds
    if bounds is not None:
        bounds.save(folder)
    atomic_write_json(folder / CLEAN_REPORT, {"format_version": 1, **report})
    return folder
