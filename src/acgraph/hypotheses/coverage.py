"""`acg coverage`: how much of the model is replaced by code that works, layer by layer.

Per layer: features (and how many ever fire), how many have a hypothesis and how many of those
pass the local threshold, the share of the layer's importance to the loss they carry, the heads
likewise, and the end-to-end cost of swapping in the layer's accepted hypotheses at once.

"Understood up to layer L" is the deepest L such that every node at or below L (every feature
and every head of layers 0..L) is replaced by a hypothesis and swapping all of them in at once
keeps ΔCE within the budget. It is measured in the real model (layers above L stay the model's
own, a fully swapped layer's MLP output is the transcoder decoder of the hypothesis values, so
the transcoder error is not counted as understood), against the original model.

Importance of a node: mean over positions of |value x d(CE)/d(value)| in the runnable ACG
(attribution patching), so "share" weighs features by how much the loss depends on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from acgraph.graph.forward import Replacement, Trace
from acgraph.progress import progress_bar

from .core import Hypothesis, Target
from .evaluate import Subject, Thresholds, local_fidelity, reference_logits, swap_costs


class _Leaves(Replacement):
    """Make every feature and pattern value a leaf, to take gradients with respect to it."""

    def __init__(self) -> None:
        self.feature_leaves: list[Tensor] = []
        self.pattern_leaves: list[Tensor] = []

    def pattern(self, layer: int, pattern: Tensor, trace: Trace) -> Tensor:
        self.pattern_leaves.append(pattern.detach().requires_grad_(True))
        return self.pattern_leaves[-1]

    def acts(self, layer: int, acts: Tensor, trace: Trace) -> Tensor:
        self.feature_leaves.append(acts.detach().requires_grad_(True))
        return self.feature_leaves[-1]


def importance(
    subject: Subject, batches: list[Tensor], progress: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """(features ``[F]`` per layer, heads ``[H]`` per layer): mean |value x gradient| of CE."""
    feats: list[Tensor] | None = None
    heads: list[Tensor] | None = None
    n = 0
    for tokens in progress_bar(batches, desc="coverage: importance", enabled=progress):
        leaves = _Leaves()
        trace = subject.acg.run(tokens, replace=leaves, grad=True)
        mask = subject.mask(tokens)[:, 1:]
        logp = F.log_softmax(trace.logits[:, :-1], -1)
        nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
        loss = nll[mask].sum()
        grads = torch.autograd.grad(loss, leaves.feature_leaves + leaves.pattern_leaves)
        L = len(leaves.feature_leaves)
        m = subject.mask(tokens)
        f = [
            (a * g).abs()[m].sum(0).detach()
            for a, g in zip(leaves.feature_leaves, grads[:L], strict=True)
        ]
        h = [
            (p * g).sum(-1).abs().transpose(1, 2)[m].sum(0).detach()
            for p, g in zip(leaves.pattern_leaves, grads[L:], strict=True)
        ]
        feats = f if feats is None else [x + y for x, y in zip(feats, f, strict=True)]
        heads = h if heads is None else [x + y for x, y in zip(heads, h, strict=True)]
        n += int(m.sum())
    assert feats is not None and heads is not None
    return [x / n for x in feats], [x / n for x in heads]


def coverage(
    subject: Subject,
    hyps: dict[Target, Hypothesis],
    batches: list[Tensor],
    *,
    thresholds: Thresholds | None = None,
    budget: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    thresholds = thresholds or Thresholds()
    n_layers = len(subject.transcoders)
    n_heads = subject.model.cfg.n_heads
    local = local_fidelity(subject, hyps, batches, progress)
    imp_f, imp_h = importance(subject, batches, progress)
    fired = _fired(subject, batches)
    refs = reference_logits(subject, batches)
    ok = {t for t, r in local.items() if r["fvu"] <= thresholds.max_fvu}
    layers = []
    understood = -1
    blocked = None
    for layer in range(n_layers):
        n_f = subject.transcoders[layer].d_sae
        f_has = torch.zeros(n_f, dtype=torch.bool)
        f_ok = torch.zeros(n_f, dtype=torch.bool)
        for t in hyps:
            if t.kind == "feature" and t.layer == layer:
                f_has[t.index] = True
                f_ok[t.index] = t in ok
        h_has = [Target("pattern", layer, h) in hyps for h in range(n_heads)]
        h_ok = [Target("pattern", layer, h) in ok for h in range(n_heads)]
        comps = {k: Target(k, layer) in hyps for k in ("mlp", "attn")}
        accepted = {t: h for t, h in hyps.items() if t.layer == layer and t in ok}
        alone = (
            swap_costs(subject, accepted, batches, refs=refs, progress=False) if accepted else None
        )
        upto = {t: h for t, h in hyps.items() if t.layer <= layer}
        complete = (bool(f_has.all()) or comps["mlp"]) and (all(h_has) or comps["attn"])
        cumulative = swap_costs(
            subject, upto, batches, engines=("model",), refs=refs, progress=False
        )
        d_upto = cumulative["model_vs_original"]["delta_ce"]
        imp = imp_f[layer]
        row = {
            "layer": layer,
            "features": n_f,
            "features_fired": int(fired[layer].sum()),
            "features_with_hypothesis": int(f_has.sum()),
            "features_accepted": int(f_ok.sum()),
            "importance_share_accepted": _share(imp, f_ok),
            "importance_share_with_hypothesis": _share(imp, f_has),
            "heads": n_heads,
            "heads_with_hypothesis": sum(h_has),
            "heads_accepted": sum(h_ok),
            "head_importance_share_accepted": _share(imp_h[layer], torch.tensor(h_ok)),
            "components_replaced": [k for k, v in comps.items() if v],
            "swap_accepted": alone,
            "swap_up_to_here": cumulative["model_vs_original"],
            "complete": complete,
        }
        layers.append(row)
        if blocked is None:
            if not complete:
                blocked = f"layer {layer}: {n_f - int(f_has.sum())} features and " + (
                    f"{n_heads - sum(h_has)} heads have no hypothesis"
                )
            elif d_upto > budget:
                blocked = f"layer {layer}: ΔCE {d_upto:+.4f} > budget {budget}"
            else:
                understood = layer
    everything = {t: h for t, h in hyps.items() if t in ok}
    total = None
    if everything:
        total = swap_costs(subject, everything, batches, refs=refs, progress=progress)
    return {
        "understood_up_to_layer": understood,
        "blocked_by": blocked,
        "budget_delta_ce": budget,
        "thresholds": {"max_fvu": thresholds.max_fvu, "max_delta_ce": thresholds.max_delta_ce},
        "n_hypotheses": len(hyps),
        "n_accepted": len(ok),
        "sources": list(dict.fromkeys(h.source for h in hyps.values())),  # in load order
        "families": _count(hyps, ok),
        "layers": layers,
        "swap_all_accepted": total,
        "n_positions": int(sum(int(subject.mask(t).sum()) for t in batches)),
    }


@torch.no_grad()
def _fired(subject: Subject, batches: list[Tensor]) -> list[Tensor]:
    from .swap import run_model

    out: list[Tensor] | None = None
    for tokens in batches:
        view = run_model(subject.model, subject.transcoders, tokens)
        m = subject.mask(tokens)
        f = [(a[m] > 0).any(0) for a in view.acts]
        out = f if out is None else [x | y for x, y in zip(out, f, strict=True)]
    assert out is not None
    return out


def _share(imp: Tensor, sel: Tensor) -> float:
    total = float(imp.sum())
    return float(imp[sel].sum()) / total if total > 0 else 0.0


def _count(hyps: dict[Target, Hypothesis], ok: set[Target]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t, h in hyps.items():
        c = out.setdefault(h.family, {"hypotheses": 0, "accepted": 0})
        c["hypotheses"] += 1
        c["accepted"] += t in ok
    return out


# ---------------------------------------------------------------- reports


def format_coverage(report: dict[str, Any]) -> str:
    """The Markdown report (also what the CLI prints)."""
    u = report["understood_up_to_layer"]
    head = (
        f"**Understood up to layer {u}**"
        if u >= 0
        else "**Understood up to layer: none** (layer 0 is not yet replaced by working code)"
    )
    lines = [
        "# Understanding coverage",
        "",
        head + f" (ΔCE budget {report['budget_delta_ce']} nats, in the real model)",
    ]
    if report["blocked_by"]:
        lines.append(f"Stops at {report['blocked_by']}.")
    lines += [
        "",
        f"{report['n_hypotheses']} hypotheses from {', '.join(report['sources'])}; "
        f"{report['n_accepted']} accepted (local FVU <= {report['thresholds']['max_fvu']}), "
        f"{report['n_positions']} held-out positions.",
        "",
        "| layer | features (fired) | with hypothesis | accepted | importance accepted | heads "
        "accepted | ΔCE layer's accepted (model / ACG) | ΔCE all of layers <= L |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["layers"]:
        s = r["swap_accepted"]
        alone = (
            f"{s['model_vs_original']['delta_ce']:+.4f} / {s['acg_vs_acg']['delta_ce']:+.4f}"
            if s
            else "-"
        )
        lines.append(
            f"| {r['layer']} | {r['features']} ({r['features_fired']}) | "
            f"{r['features_with_hypothesis']} | {r['features_accepted']} | "
            f"{r['importance_share_accepted']:.1%} | {r['heads_accepted']}/{r['heads']} | "
            f"{alone} | {r['swap_up_to_here']['delta_ce']:+.4f} |"
        )
    t = report["swap_all_accepted"]
    if t:
        lines += [
            "",
            f"All {report['n_accepted']} accepted hypotheses at once: real model ΔCE "
            f"{t['model_vs_original']['delta_ce']:+.4f} (KL {t['model_vs_original']['kl']:.4f}, "
            f"top-1 {t['model_vs_original']['top1']:.3f}); ACG ΔCE vs unswapped ACG "
            f"{t['acg_vs_acg']['delta_ce']:+.4f}.",
        ]
        if "organism" in t:
            lines += [
                "",
                "| run | " + " | ".join(_domains(t)) + " | ASR |",
                "|---" * (len(_domains(t)) + 2) + "|",
            ]
            for name, sc in t["organism"].items():
                doms = " | ".join(f"{v:.2f}" for v in sc["domains"].values())
                lines.append(f"| {name} | {doms} | {sc['attack_success_rate']:.2f} |")
    fam = ", ".join(
        f"{k} {v['accepted']}/{v['hypotheses']}" for k, v in sorted(report["families"].items())
    )
    lines += ["", f"Accepted by family: {fam}."]
    return "\n".join(lines) + "\n"


def _domains(t: dict[str, Any]) -> list[str]:
    return list(next(iter(t["organism"].values()))["domains"])


def plot_coverage(report: dict[str, Any], path: str | Path) -> Path:
    """PNG: per layer, importance share accepted (bars) and ΔCE of layers <= L (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(x, [r["importance_share_accepted"] for r in rows], color="#4c72b0", alpha=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("feature importance replaced (accepted)")
    ax.set_xticks(x)
    ax2 = ax.twinx()
    ax2.plot(x, [r["swap_up_to_here"]["delta_ce"] for r in rows], "o-", color="#c44e52")
    ax2.axhline(report["budget_delta_ce"], ls="--", color="#c44e52", lw=1, label="budget")
    ax2.set_ylim(bottom=min(0.0, *(r["swap_up_to_here"]["delta_ce"] for r in rows)))
    ax2.legend(loc="upper left", frameon=False)
    ax2.set_ylabel("ΔCE, all hypotheses of layers <= L (nats)", color="#c44e52")
    u = report["understood_up_to_layer"]
    ax.set_title(f"understood up to layer: {u if u >= 0 else 'none'}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
