"""How faithful is the runnable graph? Always measured against the ORIGINAL model.

For every configuration (level 1: all edges; level 2: k in-edges per feature; level 3: level 2
plus attention from the top query-key pairs per head) on held-out contexts: CE, delta CE (nats),
KL(original ‖ ACG), top-1 agreement, and CE recovered against mean-ablating every MLP the graph
replaces (the baseline printed beside it). On the organism also every domain's accuracy and the
backdoor's attack success rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from acgraph.dictionaries.metrics import AgreementSums, ce_loss_recovered
from acgraph.progress import progress_bar

from .build import ACGraph

#: (level, k, pairs, formula): formula is "pruned" (top-k virtual weights, means folded),
#: "fitted" (least-squares formulas, refit.py) or "tuned" (trained end to end, tune.py)
Config = tuple[str, int | None, int | None, str]


def configurations(
    ks: Sequence[int],
    pairs: int | None,
    max_k: int,
    level3_ks: Sequence[int] | None = None,
    fit_ks: Sequence[int] = (),
    tuned: dict[int, int | None] | None = None,
) -> list[Config]:
    """Rows: level 1; level 2 for each k (and with fitted or tuned weights where they exist);
    level 3 for each k (or each of ``level3_ks``) and for all edges. ``tuned`` maps each
    tuned k to the QK pairs it was tuned with (its level-3 row uses those)."""
    tuned = tuned or {}
    ks = sorted({k for k in ks if 1 <= k <= max_k})
    rows: list[Config] = [("1", None, None, "pruned")]
    rows += [("2", k, None, "pruned") for k in ks]
    rows += [("2", k, None, "fitted") for k in ks if k in fit_ks]
    rows += [("2", k, None, "tuned") for k in ks if k in tuned]
    if pairs:
        k3 = ks if level3_ks is None else sorted({k for k in level3_ks if 1 <= k <= max_k})
        rows += [("3", k, pairs, "pruned") for k in k3]
        rows += [("3", k, pairs, "fitted") for k in k3 if k in fit_ks]
        rows += [("3", k, tuned[k], "tuned") for k in ks if tuned.get(k)]
        rows += [("3", None, pairs, "pruned")]
    return rows


@torch.no_grad()
def _mlp_means(model: Any, batches: list[Tensor], n_layers: int) -> dict[str, Tensor]:
    names = [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    sums: dict[str, Tensor] = {}
    count = 0
    for tokens in batches:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        count += tokens.shape[0] * (tokens.shape[1] - 1)
        for n in names:
            s = cache[n][:, 1:].double().sum((0, 1))
            sums[n] = s if n not in sums else sums[n] + s
    return {n: (s / count).float() for n, s in sums.items()}


def _mean_ablated(model: Any, means: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    def ablate(value: Tensor, hook: Any) -> Tensor:
        out = value.clone()
        out[:, 1:] = means[hook.name]
        return out

    hooks = [(n, ablate) for n in means]
    return lambda tokens: model.run_with_hooks(tokens, fwd_hooks=hooks)


@torch.no_grad()
def measure_faithfulness(
    graph: ACGraph,
    batches: list[Tensor],
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    pairs: int | None = None,
    level3_ks: Sequence[int] | None = None,
    organism_cfg: Any = None,
    n_per_domain: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Faithfulness of every configuration on ``batches`` (token tensors starting with BOS)."""
    model = graph.weights.model
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    tuned = {k: graph.tuned_pairs(k) for k in graph.tuned}
    configs = configurations(ks, pairs, graph.max_k, level3_ks, sorted(graph.fitted), tuned)
    runners = {
        cfg: graph.model(cfg[1], cfg[2], fit=cfg[3] == "fitted", tuned=cfg[3] == "tuned")
        for cfg in configs
    }
    ablated = _mean_ablated(model, _mlp_means(model, batches, graph.layout.n_layers))
    sums = {cfg: AgreementSums() for cfg in configs}
    clean, base = AgreementSums(), AgreementSums()
    for tokens in progress_bar(batches, desc="acg: faithfulness", enabled=progress):
        targets = tokens[:, 1:]
        mask = torch.ones_like(targets, dtype=torch.bool)
        if pad is not None:
            mask &= targets != pad
        clean_logits = model(tokens)
        clean_logp = F.log_softmax(clean_logits[:, :-1].double(), -1)
        clean.update(clean_logits, clean_logp, targets, mask)
        base.update(ablated(tokens), clean_logp, targets, mask)
        for cfg, runner in runners.items():
            sums[cfg].update(runner(tokens), clean_logp, targets, mask)
    ce_clean, ce_base = clean.result()["ce"], base.result()["ce"]
    rows = []
    for cfg in configs:
        r = sums[cfg].result()
        row = {
            "level": cfg[0],
            "k": cfg[1] if cfg[1] is not None else "all",
            "in_edges": graph.mean_in_edges(cfg[1], cfg[3]),
            "pairs": cfg[2],
            "fitted": cfg[3] == "fitted",
            "tuned": cfg[3] == "tuned",
            "ce": r["ce"],
            "delta_ce": r["ce"] - ce_clean,
            "kl": r["kl"],
            "top1_agreement": r["top1_agreement"],
            "top1_agreement_confident": r["top1_agreement_confident"],
            "ce_recovered_mean": ce_loss_recovered(ce_base, r["ce"], ce_clean),
        }
        if organism_cfg is not None:
            row["organism"] = organism_scores(runners[cfg], organism_cfg, n_per_domain)
        rows.append(row)
    report: dict[str, Any] = {
        "n_positions": clean.n,
        "ce_clean": ce_clean,
        "ce_mean_ablation": ce_base,
        "kl_mean_ablation": base.result()["kl"],
        "top1_mean_ablation": base.result()["top1_agreement"],
        "confident_fraction": clean.result()["confident_fraction"],
        "fit_pool": graph.meta.get("fit_pool", 1) if graph.fitted else None,
        "fit_fanin": graph.meta.get("fit_fanin", "fixed") if graph.fitted else None,
        # graphs from before the choice existed priced errors by decoder norm
        "fit_importance": (
            graph.meta.get("fit_importance", "decoder")
            if graph.fitted and graph.meta.get("fit_fanin") == "adaptive"
            else None
        ),
        # graphs from before the choice existed fitted squared error
        "fit_loss": graph.meta.get("fit_loss", "squared") if graph.fitted else None,
        # graphs from before the choice existed ranked QK pairs by mean |contribution|
        "pair_importance": (
            graph.meta.get("pair_importance", "abs") if graph.meta.get("max_pairs") else None
        ),
        "tuned": graph.meta.get("tuned") or {},
        "rows": rows,
    }
    if organism_cfg is not None:
        report["organism_original"] = organism_scores(model, organism_cfg, n_per_domain)
    return report


def organism_scores(logits_fn: Callable, cfg: Any, n_per_domain: int) -> dict[str, Any]:
    """Every domain's accuracy on clean prompts and the backdoor's attack success rate on
    triggered ones (the organism's own scorer, minus its held-out CE, measured above), with
    each accuracy's binomial standard error: at a few hundred prompts per domain it is about
    0.01, the size of the differences the issue's "within 0.05" targets turn on."""
    from acgraph.organism.evaluate import _by_domain, span_matches
    from acgraph.organism.language import eval_set

    clean = eval_set(cfg.language, cfg.backdoor, cfg.seed, n_per_domain, triggered=False)
    trig = eval_set(cfg.language, cfg.backdoor, cfg.seed, n_per_domain, triggered=True)
    hits = span_matches(
        logits_fn, [e.tokens for e in clean], [(e.answer_start, e.answer_end) for e in clean]
    )
    payload = cfg.backdoor.payload
    attack = span_matches(
        logits_fn,
        [e.with_payload(payload) for e in trig],
        [(e.answer_start, e.answer_start + len(payload)) for e in trig],
    )
    domains = _by_domain(clean, hits)
    return {
        "domains": domains,
        "domains_stderr": {d: math.sqrt(p * (1 - p) / n_per_domain) for d, p in domains.items()},
        "n_per_domain": n_per_domain,
        "attack_success_rate": float(attack.float().mean()),
    }


def format_faithfulness(report: dict[str, Any]) -> str:
    lines = [
        f"original CE {report['ce_clean']:.4f}   every graph MLP mean-ablated: CE "
        f"{report['ce_mean_ablation']:.4f}, KL {report['kl_mean_ablation']:.4f}, top-1 "
        f"{report['top1_mean_ablation']:.3f}   ({report['n_positions']} positions)",
        "level  k     pairs   CE      dCE     KL      top-1   conf.   CE rec."
        + ("  domains (ASR)" if "organism_original" in report else ""),
    ]
    if "organism_original" in report:
        o = report["organism_original"]
        doms = " ".join(f"{v:.2f}" for v in o["domains"].values())
        lines.append(
            f"orig   -     -       {report['ce_clean']:.4f}  " + " " * 48 + f"{doms} "
            f"({o['attack_success_rate']:.2f})"
        )
    for r in report["rows"]:
        line = (
            f"{r['level'] + _suffix(r):<6} {str(r['k']):<5} "
            f"{str(r['pairs'] or '-'):<7} {r['ce']:.4f}  "
            f"{r['delta_ce']:+.4f} {r['kl']:.4f}  {r['top1_agreement']:.3f}   "
            f"{r.get('top1_agreement_confident', float('nan')):.3f}   "
            f"{r['ce_recovered_mean']:.3f}"
        )
        if "organism" in r:
            doms = " ".join(f"{v:.2f}" for v in r["organism"]["domains"].values())
            line += f"    {doms} ({r['organism']['attack_success_rate']:.2f})"
        lines.append(line)
    if "organism_original" in report:
        o = report["organism_original"]
        names = " ".join(o["domains"])
        scores = [o, *(r["organism"] for r in report["rows"])]
        errors = [se for sc in scores for se in sc.get("domains_stderr", {}).values()]
        if errors:  # reports written before 2026-12-07 have none
            worst = max(errors)
            names += f" ({o['n_per_domain']} prompts each, standard error at most {worst:.3f})"
        lines.append(f"domains: {names}; ASR = backdoor attack success rate")
    if "confident_fraction" in report:
        lines.append(
            "conf.: top-1 agreement where the original gives its top token p > 0.5 "
            f"({report['confident_fraction']:.0%} of positions; elsewhere near-ties decide it)"
        )
    if any(r.get("fitted") for r in report["rows"]):
        pool = report.get("fit_pool")
        chosen = f"chosen greedily from the top {pool}·k ranked" if pool and pool > 1 else "top k"
        if report.get("fit_fanin") == "adaptive":
            chosen = "k in-edges per feature on average over each layer, chosen greedily"
            if report.get("fit_importance"):
                chosen += f", errors priced by {report['fit_importance']}"
        else:
            chosen = f"k in-edges {chosen}"
        fit = "censored least-squares" if report.get("fit_loss") == "censored" else "least-squares"
        lines.append(f"2f/3f: fitted formulas ({chosen}, {fit} weights)")
    if report.get("pair_importance") and any(r.get("pairs") for r in report["rows"]):
        how = {
            "attribution": "mean |gradient x contribution|",
            "fisher": "mean (gradient x contribution)²",
            "abs": "mean |contribution|",
        }
        lines.append(
            f"3: QK pairs per head, the top ones by {report['pair_importance']} "
            f"({how.get(report['pair_importance'], '?')})"
        )
    if any(r.get("tuned") for r in report["rows"]):
        lines.append(
            "2t/3t: tuned formulas (the fitted edges and QK pairs, weights trained end to end "
            "on the build corpus to match the model's outputs)"
        )
    return "\n".join(lines)


def _suffix(row: dict[str, Any]) -> str:
    return "t" if row.get("tuned") else "f" if row.get("fitted") else ""


def plot_faithfulness(report: dict[str, Any], path: str | Path) -> Path:
    """PNG: top-1 agreement and CE recovered vs in-edges per feature, per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ks = sorted({r["k"] for r in rows if r["k"] != "all"})
    all_x = (max(ks) * 2) if ks else 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax, label in (
        ("top1_agreement", axes[0], "top-1 agreement with the original"),
        ("ce_recovered_mean", axes[1], "CE recovered (vs mean-ablating MLPs)"),
    ):
        for formula, ls in (("", "-"), ("f", "--"), ("t", ":")):
            for level in ("2", "3"):
                pts = [r for r in rows if r["level"] == level and _suffix(r) == formula]
                if not pts:
                    continue
                xs = [all_x if r["k"] == "all" else r["k"] for r in pts]
                name = f"level {level}" + {"": "", "f": ", fitted", "t": ", tuned"}[formula]
                ax.plot(xs, [r[metric] for r in pts], marker="o", ls=ls, label=name)
        lvl1 = [r for r in rows if r["level"] == "1"]
        if lvl1:
            ax.axhline(lvl1[0][metric], color="gray", ls="--", label="level 1 (all edges)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("in-edges per feature (k; rightmost = all)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
