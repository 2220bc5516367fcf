"""Attribution targets: salient logits (circuit-tracer's rule), chosen logits, logit
differences, or one feature's pre-activation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acgraph.errors import ConfigError

from .graph import Target


@dataclass(frozen=True)
class LogitSpec:
    """The demeaned logit of one token (id or single-token string) at the last position."""

    token: int | str


@dataclass(frozen=True)
class LogitDiffSpec:
    """logit(positive) - logit(negative) at the last position."""

    positive: int | str
    negative: int | str


@dataclass(frozen=True)
class FeatureSpec:
    """The pre-activation of transcoder feature ``feature`` of ``layer`` at ``position``."""

    layer: int
    position: int
    feature: int


TargetSpec = LogitSpec | LogitDiffSpec | FeatureSpec


def token_id(model, token: int | str) -> int:
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise ConfigError(
                f"token id {token} is outside the vocabulary (0..{model.cfg.d_vocab})"
            )
        return token
    if model.tokenizer is None:
        raise ConfigError(f"cannot look up token {token!r}: the model has no tokenizer")
    ids = model.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        ids2 = model.tokenizer.encode(" " + token, add_special_tokens=False)
        if len(ids2) == 1:
            ids = ids2
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if len(ids) != 1 or (unk is not None and ids[0] == unk):
        raise ConfigError(f"{token!r} is not a single token of this vocabulary (ids {ids})")
    return int(ids[0])


def _decode(model, idx: int) -> str:
    return model.tokenizer.decode([idx]) if model.tokenizer is not None else str(idx)


def salient_logits(
    logits: Tensor, max_n_logits: int = 10, desired_logit_prob: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Top logits until their cumulative probability reaches ``desired_logit_prob`` (at most
    ``max_n_logits``): (token ids, probabilities)."""
    if max_n_logits < 1 or not 0.0 < desired_logit_prob <= 1.0:
        raise ConfigError("need max_n_logits >= 1 and 0 < desired_logit_prob <= 1")
    probs = torch.softmax(logits.double(), -1).float()
    top_p, top_i = probs.topk(min(max_n_logits, probs.shape[0]))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    return top_i[:cutoff], top_p[:cutoff]


def make_targets(
    model,
    ts,
    cap,
    lin,
    src,
    specs: list[TargetSpec] | None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
) -> tuple[list[Target], Tensor]:
    """Targets and their seed gradients ``[K, d]`` (in resid_mid space of the target's layer
    for features, in the final residual for logit-like targets)."""
    L = model.cfg.n_layers
    n = int(cap.tokens.shape[0])
    last = n - 1
    W_U = lin.W_U  # [d, vocab]
    mean_u = W_U.mean(-1)
    probs = torch.softmax(cap.logits[last].double(), -1).float()
    targets: list[Target] = []
    seeds: list[Tensor] = []
    pos_t = torch.tensor([last], device=W_U.device)

    def add_logit(idx: int) -> None:
        targets.append(
            Target(_decode(model, idx), "logit", L, last, float(probs[idx]), vocab_idx=idx)
        )
        seeds.append(lin.final_to_resid(pos_t, (W_U[:, idx] - mean_u)[None])[0])

    if specs is None:
        ids, _ = salient_logits(cap.logits[last], max_n_logits, desired_logit_prob)
        for idx in ids.tolist():
            add_logit(int(idx))
    else:
        if not specs:
            raise ConfigError("empty target list")
        for spec in specs:
            if isinstance(spec, LogitSpec):
                add_logit(token_id(model, spec.token))
            elif isinstance(spec, LogitDiffSpec):
                a, b = token_id(model, spec.positive), token_id(model, spec.negative)
                label = f"{_decode(model, a)} - {_decode(model, b)}"
                targets.append(Target(label, "logit_diff", L, last, 1.0, vocab_idx=a))
                seeds.append(lin.final_to_resid(pos_t, (W_U[:, a] - W_U[:, b])[None])[0])
            elif isinstance(spec, FeatureSpec):
                if not 0 <= spec.layer < L:
                    raise ConfigError(f"feature target layer {spec.layer} outside 0..{L - 1}")
                if not 0 <= spec.position < n:
                    raise ConfigError(f"feature target position {spec.position} outside 0..{last}")
                d_sae = ts[spec.layer].d_sae
                if not 0 <= spec.feature < d_sae:
                    raise ConfigError(
                        f"layer {spec.layer} has features 0..{d_sae - 1}, not {spec.feature}"
                    )
                enc = lin.ts_enc[spec.layer][:, spec.feature][None]
                p = torch.tensor([spec.position], device=W_U.device)
                targets.append(
                    Target(
                        f"L{spec.layer}/f{spec.feature}@{spec.position}",
                        "feature",
                        spec.layer,
                        spec.position,
                        1.0,
                        feature=spec.feature,
                    )
                )
                seeds.append(lin.tc_input_to_mid(spec.layer, p, enc)[0])
            else:
                raise ConfigError(f"unknown target spec {spec!r}")
        # custom targets share the influence equally (logits keep their probabilities)
        if all(t.kind != "logit" for t in targets):
            for t in targets:
                t.weight = 1.0 / len(targets)
    return targets, torch.stack(seeds)
