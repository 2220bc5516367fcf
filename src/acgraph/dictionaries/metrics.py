"""Dictionary metrics, defined once (ANCHORS.md, "Metric definitions").

- FVU = E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), sums streamed over every eval token in
  float64 (:class:`FVUAccumulator`). The mean predictor scores exactly 1, a perfect one 0.
- L0 = mean number of active latents per token; dead = never active over the N eval tokens;
  dense = active on more than 10% of them (:class:`SparsityAccumulator`).
- Splicing (:func:`evaluate_dictionaries`): CE of the clean model; CE with the dictionary's
  output in place of its output hook (a transcoder replaces ``hook_out`` with
  ``decode(encode(hook_in))``, reading the *spliced* model's own ``hook_in``); CE with that hook
  zero-ablated and mean-ablated (mean over the eval tokens); CE loss recovered
  ``(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)`` against both; delta CE
  ``CE_spliced - CE_clean`` in nats; ``KL(original || spliced)``. Reported for each dictionary
  alone and for all of them spliced at once (all hooks ablated at once for the baselines).

Positions: activation statistics use every token that is not BOS/EOS/separator/padding (the
tokens dictionaries train on). Interventions (splice, ablations) apply at those same positions
only; special positions keep the model's own activations. CE and KL are averaged over positions
whose input token is not special and whose next token is not padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from acgraph.errors import ConfigError

from .activation_stream import capture_hooks, special_token_ids
from .dictionary import SparseDictionary

DENSE_FRACTION = 0.10


class FVUAccumulator:
    """Streams E||x - x_hat||^2 and Var(x) = E||x||^2 - ||E x||^2 in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_sq_err = 0.0
        self.sum_sq = 0.0
        self.sum: Tensor | None = None

    def update(self, target: Tensor, prediction: Tensor) -> None:
        t = target.reshape(-1, target.shape[-1]).double()
        p = prediction.reshape(-1, prediction.shape[-1]).double()
        self.n += t.shape[0]
        self.sum_sq_err += float((t - p).pow(2).sum())
        self.sum_sq += float(t.pow(2).sum())
        s = t.sum(0)
        self.sum = s if self.sum is None else self.sum + s

    @property
    def mse(self) -> float:
        return self.sum_sq_err / max(self.n, 1)

    @property
    def variance(self) -> float:
        if self.n == 0 or self.sum is None:
            return float("nan")
        mean = self.sum / self.n
        return self.sum_sq / self.n - float(mean.pow(2).sum())

    def fvu(self) -> float:
        var = self.variance
        return self.mse / var if var > 0 else float("nan")


def fvu(target: Tensor, prediction: Tensor) -> float:
    """FVU of one set of rows (see :class:`FVUAccumulator`)."""
    acc = FVUAccumulator()
    acc.update(target, prediction)
    return acc.fvu()


class SparsityAccumulator:
    """Counts how often each latent fires: L0, dead and dense fractions."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.active_total = 0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)

    def update(self, acts: Tensor) -> None:
        active = acts.reshape(-1, acts.shape[-1]) != 0
        self.n += active.shape[0]
        self.active_total += int(active.sum())
        self.fire_counts += active.sum(0).double().cpu()

    def l0(self) -> float:
        return self.active_total / max(self.n, 1)

    def dead_fraction(self) -> float:
        return float((self.fire_counts == 0).double().mean())

    def dense_fraction(self, threshold: float = DENSE_FRACTION) -> float:
        if self.n == 0:
            return float("nan")
        return float((self.fire_counts / self.n > threshold).double().mean())

    def as_dict(self) -> dict[str, float]:
        return {
            "l0": self.l0(),
            "dead_fraction": self.dead_fraction(),
            "dense_fraction": self.dense_fraction(),
        }


def ce_loss_recovered(ce_ablated: float, ce_spliced: float, ce_clean: float) -> float:
    denom = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / denom if denom != 0 else float("nan")


# ---------------------------------------------------------------- splicing


#: a position is "confident" when the reference gives its top token more than this probability:
#: there top-1 agreement is not decided by a near-tie that any perturbation flips
CONFIDENT_P = 0.5


class AgreementSums:
    """Running CE, KL(reference ‖ logits) and top-1 agreement over metric positions (float64),
    the agreement also over the positions where the reference is confident (``CONFIDENT_P``)."""

    def __init__(self) -> None:
        self.ce = 0.0
        self.kl = 0.0
        self.top1 = 0.0
        self.n = 0
        self.top1_confident = 0.0
        self.n_confident = 0

    def update(self, logits: Tensor, clean_logp: Tensor, targets: Tensor, mask: Tensor) -> None:
        logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(-1, targets[..., None])[..., 0]
        kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
        agree = (logp.argmax(-1) == clean_logp.argmax(-1)).double()
        self.ce += float(nll[mask].double().sum())
        self.kl += float(kl[mask].double().sum())
        self.top1 += float(agree[mask].sum())
        self.n += int(mask.sum())
        confident = mask & (clean_logp.max(-1).values > math.log(CONFIDENT_P))
        self.top1_confident += float(agree[confident].sum())
        self.n_confident += int(confident.sum())

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            "ce": self.ce / n,
            "kl": self.kl / n,
            "top1_agreement": self.top1 / n,
            "top1_agreement_confident": self.top1_confident / max(self.n_confident, 1),
            "confident_fraction": self.n_confident / n,
        }


def splice_hooks(
    dictionaries: Sequence[SparseDictionary], keep: Tensor
) -> list[tuple[str, Callable]]:
    """Forward hooks replacing each dictionary's output hook with its prediction.

    The prediction reads ``hook_in`` in the same (spliced) forward pass; special positions
    (``keep`` False) keep the model's own activation.
    """
    inputs: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable]] = []
    for i, d in enumerate(dictionaries):
        cfg = d.cfg
        if cfg.hook_in == cfg.hook_out:

            def replace_same(value: Tensor, hook: Any, d: SparseDictionary = d) -> Tensor:
                new = d(value).to(value.dtype)
                return torch.where(keep[..., None], new, value)

            hooks.append((cfg.hook_in, replace_same))
            continue

        def store(value: Tensor, hook: Any, i: int = i) -> None:
            inputs[i] = value

        def replace(value: Tensor, hook: Any, i: int = i, d: SparseDictionary = d) -> Tensor:
            new = d(inputs.pop(i)).to(value.dtype)
            return torch.where(keep[..., None], new, value)

        hooks.append((cfg.hook_in, store))
        hooks.append((cfg.hook_out, replace))
    return hooks


def _ablation_hooks(
    names: Sequence[str], keep: Tensor, means: dict[str, Tensor] | None
) -> list[tuple[str, Callable]]:
    hooks = []
    for name in dict.fromkeys(names):

        def ablate(value: Tensor, hook: Any, name: str = name) -> Tensor:
            fill = (
                torch.zeros_like(value) if means is None else means[name].to(value).expand_as(value)
            )
            return torch.where(keep[..., None], fill, value)

        hooks.append((name, ablate))
    return hooks


@torch.no_grad()
def evaluate_dictionaries(
    model: Any,
    dictionaries: Sequence[SparseDictionary],
    tokens: Tensor,
    *,
    batch_size: int = 16,
    exclude_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    splice: bool = True,
    alone: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruction, sparsity and splicing metrics on ``tokens [n_contexts, context_size]``.

    Returns ``{"n_tokens", "n_ce_positions", "ce_clean", "dictionaries": {name: {...}},
    "all": {...}}`` (``all`` only with two or more dictionaries writing distinct hooks; see the
    module doc). ``alone=False`` splices them all at once only, not also one at a time (for
    N dictionaries N times fewer forward passes; the per-dictionary entries then hold the
    reconstruction and sparsity metrics alone).
    """
    if not dictionaries:
        raise ConfigError("no dictionaries to evaluate")
    names = [str(d.cfg.name) for d in dictionaries]
    if len(set(names)) != len(names):
        raise ConfigError(f"dictionary names must be distinct, got {names}")
    from .formats import check_compatible

    for d in dictionaries:
        check_compatible(d, model)
    tokenizer = getattr(model, "tokenizer", None)
    if exclude_token_ids is None:
        exclude_token_ids = special_token_ids(tokenizer)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
    device = model.cfg.device
    for d in dictionaries:
        d.eval()
    out_hooks = list(dict.fromkeys(d.cfg.hook_out for d in dictionaries))
    all_hooks = list(
        dict.fromkeys([h for d in dictionaries for h in (d.cfg.hook_in, d.cfg.hook_out)])
    )
    fvus = [FVUAccumulator() for _ in dictionaries]
    sparsity = [SparsityAccumulator(d.d_sae) for d in dictionaries]
    hook_sums: dict[str, Tensor] = {}
    n_tokens = 0

    batches = [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    from acgraph.progress import progress_bar

    # pass 1: reconstruction, sparsity, and the mean of each output hook
    for batch in progress_bar(batches, desc="eval: reconstruction", enabled=progress):
        batch = batch.to(device)
        keep = ~torch.isin(batch, excluded.to(device))
        captured = capture_hooks(model, batch, all_hooks, stop=False)
        n_tokens += int(keep.sum())
        for i, d in enumerate(dictionaries):
            x = captured[d.cfg.hook_in][keep]
            y = captured[d.cfg.hook_out][keep]
            out, acts, _ = d.forward_with_acts(x)
            fvus[i].update(y, out)
            sparsity[i].update(acts)
        for h in out_hooks:
            s = captured[h][keep].double().sum(0)
            hook_sums[h] = s if h not in hook_sums else hook_sums[h] + s

    report: dict[str, Any] = {"n_tokens": n_tokens, "dictionaries": {}}
    for i, d in enumerate(dictionaries):
        report["dictionaries"][names[i]] = {
            "kind": d.cfg.kind,
            "activation": d.cfg.activation,
            "hook_in": d.cfg.hook_in,
            "hook_out": d.cfg.hook_out,
            "d_sae": d.d_sae,
            "fvu": fvus[i].fvu(),
            "mse": fvus[i].mse,
            **sparsity[i].as_dict(),
        }
    if not splice:
        return report
    means = {h: (hook_sums[h] / max(n_tokens, 1)).float() for h in out_hooks}

    # pass 2: CE / KL under every intervention
    shared = len(out_hooks) < len(dictionaries)
    if not alone and shared:
        raise ConfigError(
            "several dictionaries write the same hook: they cannot be spliced at once"
        )
    one_at_a_time = alone or len(dictionaries) == 1
    groups = [(names[i], [d]) for i, d in enumerate(dictionaries)] if one_at_a_time else []
    if len(dictionaries) > 1 and not shared:
        groups.append(("all", list(dictionaries)))
    elif shared:
        report["all_skipped"] = "several dictionaries write the same hook; no joint splice"
    sums: dict[tuple[str, str], AgreementSums] = {}
    clean = AgreementSums()
    for batch in progress_bar(batches, desc="eval: splicing", enabled=progress):
        batch = batch.to(device)
        keep = ~torch.isin(batch, excluded.to(device))
        targets = batch[:, 1:]
        mask = keep[:, :-1]
        if pad_token_id is not None:
            mask = mask & (targets != pad_token_id)
        clean_logits = model(batch)
        clean_logp = F.log_softmax(clean_logits[:, :-1].double(), dim=-1)
        clean.update(clean_logits, clean_logp, targets, mask)
        for group, ds in groups:
            hooks_out = [d.cfg.hook_out for d in ds]
            variants = {
                "spliced": splice_hooks(ds, keep),
                "zero_ablation": _ablation_hooks(hooks_out, keep, None),
                "mean_ablation": _ablation_hooks(hooks_out, keep, means),
            }
            for variant, fwd_hooks in variants.items():
                logits = model.run_with_hooks(batch, fwd_hooks=fwd_hooks)
                sums.setdefault((group, variant), AgreementSums()).update(
                    logits, clean_logp, targets, mask
                )
    ce_clean = clean.result()["ce"]
    report["ce_clean"] = ce_clean
    report["n_ce_positions"] = clean.n
    for group, _ in groups:
        spliced = sums[(group, "spliced")].result()
        zero = sums[(group, "zero_ablation")].result()
        mean = sums[(group, "mean_ablation")].result()
        entry = {
            "ce_clean": ce_clean,
            "ce_spliced": spliced["ce"],
            "ce_zero_ablation": zero["ce"],
            "ce_mean_ablation": mean["ce"],
            "ce_recovered_zero": ce_loss_recovered(zero["ce"], spliced["ce"], ce_clean),
            "ce_recovered_mean": ce_loss_recovered(mean["ce"], spliced["ce"], ce_clean),
            "delta_ce": spliced["ce"] - ce_clean,
            "kl": spliced["kl"],
            "kl_zero_ablation": zero["kl"],
            "kl_mean_ablation": mean["kl"],
            "top1_agreement": spliced["top1_agreement"],
            "top1_agreement_confident": spliced["top1_agreement_confident"],
            "confident_fraction": spliced["confident_fraction"],
        }
        if group == "all":
            entry["dictionaries"] = names
            report["all"] = entry
        else:
            report["dictionaries"][group].update(entry)
    return report
