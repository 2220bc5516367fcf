"""How much top-1 agreement can a near-exact replacement of the organism keep?

    .venv/bin/python bench/graph/near_ties.py --out bench/results/graph_near_ties_organism.json

On the held-out contexts `acg faithfulness` uses (organism:poisoned, seed 1, 128 tokens): the
gap between the original model's top two logits at every position, and the top-1 agreement and
KL(original ‖ noisy) when i.i.d. Gaussian noise of a given size is added to the original logits.
A replacement whose logit errors were that small and unstructured would agree that often; it
puts the ACG's top-1 numbers (and the issue's 0.90 target) against the size of error they need.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

MARGINS = (0.01, 0.03, 0.1, 0.3, 1.0)
NOISE = (0.003, 0.01, 0.03, 0.1, 0.3)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="noise draws per level")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from acgraph.cli.graph import _batches
    from acgraph.models import load_model

    model = load_model("organism")
    batches = _batches(model, "organism:poisoned", args.contexts, 128, 1, 16)
    logits = torch.cat([model(t)[:, :-1].double().flatten(0, 1) for t in batches])
    top2 = logits.topk(2, -1).values
    gap = top2[:, 0] - top2[:, 1]
    logp = F.log_softmax(logits, -1)
    p1 = logp.max(-1).values.exp()
    gen = torch.Generator().manual_seed(0)
    noise = {}
    for sigma in NOISE:
        agree, kl = [], []
        for _ in range(args.repeats):
            noisy = logits + sigma * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
            agree.append(float((noisy.argmax(-1) == logits.argmax(-1)).double().mean()))
            kl.append(float((logp.exp() * (logp - F.log_softmax(noisy, -1))).sum(-1).mean()))
        noise[str(sigma)] = {"top1_agreement": sum(agree) / len(agree), "kl": sum(kl) / len(kl)}
    result = {
        "benchmark": "organism top-1 near-ties",
        "command": "python bench/graph/near_ties.py " + f"--contexts {args.contexts} "
        f"--repeats {args.repeats} --out {args.out}",
        "positions": int(len(gap)),
        "top2_gap_below": {str(m): float((gap < m).double().mean()) for m in MARGINS},
        "top1_probability_above_0.5": float((p1 > 0.5).double().mean()),
        "logit_noise": noise,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
