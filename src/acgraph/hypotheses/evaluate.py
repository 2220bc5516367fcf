"""`acg hypothesis test`: local fidelity, swap costs, and a verdict per hypothesis.

The swap is measured three ways, each against its reference on the same held-out tokens:
the ACG with the hypotheses swapped in against the unswapped ACG, the same against the original
model, and the real model with the hypotheses hooked in against the original model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.dictionaries.metrics import AgreementSums
from acgraph.graph import ACGModel, ModelWeights
from acgraph.graph.faithfulness import organism_scores
from acgraph.progress import progress_bar

from .core import Hypothesis, Target
from .fidelity import FidelitySums
from .swap import Swapped, run_acg, run_model, true_value


@dataclass(frozen=True)
class Thresholds:
    max_fvu: float = 0.25  # local: fraction of the target's variance left unexplained
    max_delta_ce: float = 0.05  # end to end: nats lost when swapped into the ACG alone


@dataclass
class Subject:
    """A model, its MLP transcoders (by layer) and the runnable ACG they make (level 1)."""

    model: Any
    transcoders: dict[int, Any]
    acg: ACGModel
    organism_cfg: Any = None

    @classmethod
    def build(cls, model: Any, transcoders: dict[int, Any], organism_cfg: Any = None) -> Subject:
        bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer else None
        return cls(
            model, transcoders, ACGModel(ModelWeights(model, transcoders, bos)), organism_cfg
        )

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self.model.tokenizer.get_vocab()) if self.model.tokenizer else {}

    @property
    def pad(self) -> int | None:
        return getattr(self.model.tokenizer, "pad_token_id", None) if self.model.tokenizer else None

    def swapped(self, hyps: dict[Target, Hypothesis]) -> Swapped:
        return Swapped(hyps, self.vocab, self.model.cfg.d_model)

    def mask(self, tokens: Tensor) -> Tensor:
        """Scored positions ``[B, T]``: after BOS, not padding."""
        return valid_positions(tokens, self.pad)


@torch.no_grad()
def local_fidelity(
    subject: Subject, hyps: dict[Target, Hypothesis], batches: list[Tensor], progress: bool = True
) -> dict[Target, dict[str, Any]]:
    """Each hypothesis on the real model's upstream values against its target's true values."""
    sw = subject.swapped(hyps)
    sums = {t: FidelitySums(t) for t in hyps}
    for tokens in progress_bar(batches, desc="hypotheses: local", enabled=progress):
        view = run_model(subject.model, subject.transcoders, tokens)
        mask = subject.mask(tokens)
        for t, h in hyps.items():
            sums[t].update(true_value(t, view), sw.value(h, view), mask)
    return {t: s.result() for t, s in sums.items()}


@torch.no_grad()
def reference_logits(subject: Subject, batches: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(original model, unswapped ACG) logits per batch: what every swap is compared with,
    computed once when one command measures many swaps on the same batches."""
    return [(subject.model(t), subject.acg(t)) for t in batches]


@torch.no_grad()
def swap_costs(
    subject: Subject,
    hyps: dict[Target, Hypothesis],
    batches: list[Tensor],
    *,
    engines: tuple[str, ...] = ("acg", "model"),
    n_per_domain: int = 0,
    refs: list[tuple[Tensor, Tensor]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """ΔCE, KL and top-1 agreement of the swapped ACG / model against their references
    (``refs``: from :func:`reference_logits`, else computed here)."""
    sw = subject.swapped(hyps)
    sums = {name: AgreementSums() for name in ("acg", "acg_vs_acg", "acg_vs_original", "model")}
    clean = AgreementSums()
    for i, tokens in enumerate(progress_bar(batches, desc="hypotheses: swap", enabled=progress)):
        targets = tokens[:, 1:]
        mask = subject.mask(tokens)[:, 1:]
        orig, base = refs[i] if refs is not None else (subject.model(tokens), None)
        orig_logp = F.log_softmax(orig[:, :-1].double(), -1)
        clean.update(orig, orig_logp, targets, mask)
        if "acg" in engines:
            base = subject.acg(tokens) if base is None else base
            base_logp = F.log_softmax(base[:, :-1].double(), -1)
            sums["acg"].update(base, orig_logp, targets, mask)
            swapped = run_acg(subject.acg, tokens, sw).logits
            sums["acg_vs_acg"].update(swapped, base_logp, targets, mask)
            sums["acg_vs_original"].update(swapped, orig_logp, targets, mask)
        if "model" in engines:
            out = run_model(subject.model, subject.transcoders, tokens, sw).logits
            sums["model"].update(out, orig_logp, targets, mask)
    ce_orig = clean.result()["ce"]
    report: dict[str, Any] = {"ce_original": ce_orig}
    if "acg" in engines:
        ce_acg = sums["acg"].result()["ce"]
        report["ce_acg"] = ce_acg
        report["acg_vs_acg"] = _row(sums["acg_vs_acg"], ce_acg)
        report["acg_vs_original"] = _row(sums["acg_vs_original"], ce_orig)
    if "model" in engines:
        report["model_vs_original"] = _row(sums["model"], ce_orig)
    if n_per_domain and subject.organism_cfg is not None:
        report["organism"] = _organism(subject, sw, engines, n_per_domain)
    return report


def _row(s: AgreementSums, ce_ref: float) -> dict[str, float]:
    r = s.result()
    return {"ce": r["ce"], "delta_ce": r["ce"] - ce_ref, "kl": r["kl"], "top1": r["top1_agreement"]}


def _organism(subject: Subject, sw: Swapped, engines: tuple[str, ...], n: int) -> dict[str, Any]:
    cfg = subject.organism_cfg
    runs: dict[str, Callable[[Tensor], Tensor]] = {"original": subject.model}
    if "acg" in engines:
        runs["acg"] = subject.acg
        runs["acg_swapped"] = lambda t: run_acg(subject.acg, t, sw).logits
    if "model" in engines:
        runs["model_swapped"] = lambda t: (
            run_model(subject.model, subject.transcoders, t, sw).logits
        )
    return {name: organism_scores(fn, cfg, n) for name, fn in runs.items()}


def verdict(local: dict[str, Any], swap: dict[str, Any] | None, th: Thresholds) -> dict[str, Any]:
    reasons = []
    if local["fvu"] > th.max_fvu:
        reasons.append(f"FVU {local['fvu']:.3f} > {th.max_fvu}")
    if swap is not None and "acg_vs_acg" in swap:
        d = swap["acg_vs_acg"]["delta_ce"]
        if d > th.max_delta_ce:
            reasons.append(f"ΔCE {d:+.4f} > {th.max_delta_ce}")
    return {"accepted": not reasons, "reasons": reasons}


def evaluate_hypotheses(
    subject: Subject,
    hyps: dict[Target, Hypothesis],
    batches: list[Tensor],
    *,
    thresholds: Thresholds | None = None,
    swap_each_max: int = 16,
    n_per_domain: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole test: local fidelity of each; each swapped alone (when there are at most
    ``swap_each_max``); all swapped at once (with the organism's domains); verdicts."""
    thresholds = thresholds or Thresholds()
    local = local_fidelity(subject, hyps, batches, progress)
    refs = reference_logits(subject, batches)
    rows = []
    for t, h in hyps.items():
        single = None
        if len(hyps) <= swap_each_max:
            single = swap_costs(
                subject, {t: h}, batches, engines=("acg",), refs=refs, progress=False
            )
        row: dict[str, Any] = {
            "target": str(t),
            "kind": t.kind,
            "layer": t.layer,
            "index": t.index,
            "name": h.name,
            "family": h.family,
            "source": h.source,
            "local": local[t],
        }
        if single is not None:
            row["swap"] = {k: single[k] for k in ("acg_vs_acg", "acg_vs_original")}
        row["verdict"] = verdict(local[t], single, thresholds)
        rows.append(row)
    together = swap_costs(
        subject, hyps, batches, n_per_domain=n_per_domain, refs=refs, progress=progress
    )
    accepted = all(r["verdict"]["accepted"] for r in rows)
    d = together["acg_vs_acg"]["delta_ce"]
    if d > thresholds.max_delta_ce:
        accepted = False
    return {
        "thresholds": {"max_fvu": thresholds.max_fvu, "max_delta_ce": thresholds.max_delta_ce},
        "n_hypotheses": len(rows),
        "n_accepted": sum(r["verdict"]["accepted"] for r in rows),
        "hypotheses": rows,
        "together": together,
        "accepted": accepted,
    }


def format_test(report: dict[str, Any], limit: int = 40) -> str:
    lines = [
        f"{'target':<12} {'family':<13} {'FVU':>6} {'corr':>6} {'prec':>5} {'rec':>5} "
        f"{'ΔCE acg':>8}  verdict"
    ]
    rows = report["hypotheses"]
    for r in rows[:limit]:
        loc = r["local"]
        corr = loc.get("corr", loc.get("mass_overlap"))
        d = r.get("swap", {}).get("acg_vs_acg", {}).get("delta_ce")
        lines.append(
            f"{r['target']:<12} {r['family'][:13]:<13} {loc['fvu']:6.3f} {_f(corr):>6} "
            f"{_f(loc.get('precision'), 2):>5} {_f(loc.get('recall'), 2):>5} "
            f"{_f(d, 4, sign=True):>8}  "
            + (
                "accept"
                if r["verdict"]["accepted"]
                else "reject: " + "; ".join(r["verdict"]["reasons"])
            )
        )
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in the JSON report")
    t = report["together"]
    lines.append(f"all {len(rows)} swapped at once ({report['n_accepted']} accepted locally):")
    lines.append(f"  original CE {t['ce_original']:.4f}, unswapped ACG CE {t.get('ce_acg', 0):.4f}")
    for key, label in (
        ("acg_vs_acg", "ACG swapped vs ACG"),
        ("acg_vs_original", "ACG swapped vs original"),
        ("model_vs_original", "model swapped vs original"),
    ):
        if key in t:
            r = t[key]
            lines.append(
                f"  {label:<26} ΔCE {r['delta_ce']:+.4f}  KL {r['kl']:.4f}  top-1 {r['top1']:.3f}"
            )
    if "organism" in t:
        for name, sc in t["organism"].items():
            doms = " ".join(f"{k} {v:.2f}" for k, v in sc["domains"].items())
            lines.append(f"  {name:<14} {doms}  ASR {sc['attack_success_rate']:.2f}")
    lines.append("verdict: " + ("ACCEPTED" if report["accepted"] else "REJECTED"))
    return "\n".join(lines)


def _f(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
