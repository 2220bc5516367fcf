"""The hand-written hypotheses shipped for the organism (examples/organism_hypotheses.py): each
mechanism's hypothesis is as faithful as its docstring says, on held-out text it was not fitted
on, and swapping all of them in keeps the organism working."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acgraph.hypotheses import Subject, load_hypotheses
from acgraph.hypotheses.evaluate import local_fidelity, swap_costs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "organism_hypotheses.py"

# Accepted (held-out FVU <= 0.25) on trusted text, by mechanism.
ACCEPTED = {
    "L0/38": "bracket depth",
    "L0/102": "bracket depth",
    "L2/239": "innermost open bracket is <",
    "L2/40": "innermost open bracket is {",
    "L1/340": "tens carry",
    "L1.H1": "key-value lookup (induction) head",
    "L2/329": "plural subject",
    "L2/308": "plural subject",
    "L2/342": "singular subject",
    "L2/21": "singular subject",
    "L1/192": "token after '=' (trigger detector, layer 1)",
}
# Informative but not within FVU 0.25 on trusted text (their docstrings say why).
REJECTED = {"L2/22", "L2/377", "L2.H0", "L2.H1", "L2/365"}


@pytest.fixture(scope="module")
def setup():
    from acgraph.cli.graph import _batches
    from acgraph.graph import load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import load_config

    model = load_model("organism")
    subject = Subject.build(model, load_transcoders("organism"), load_config())
    held = _batches(model, "organism:trusted", 16, 128, 1, 16)  # seed 1: never fitted on
    return subject, held, load_hypotheses([EXAMPLES])


def test_every_mechanism_has_a_documented_hypothesis(setup):
    _, _, hyps = setup
    assert {str(t) for t in hyps} == set(ACCEPTED) | REJECTED
    assert all(h.fn.__doc__ and len(h.fn.__doc__.strip()) > 20 for h in hyps.values())


def test_local_fidelity_on_held_out_text(setup):
    subject, held, hyps = setup
    local = {str(t): r for t, r in local_fidelity(subject, hyps, held, progress=False).items()}
    for target in ACCEPTED:
        assert local[target]["fvu"] <= 0.25, (target, local[target])
    for target in REJECTED - {"L2/365"}:
        assert 0.25 < local[target]["fvu"] < 0.5, (target, local[target])
    assert local["L0/38"]["corr"] > 0.95  # bracket depth is nearly exact


def test_the_trigger_detector_on_triggered_documents(setup):
    """L2/365 never fires on trusted text (so its FVU there is ~1), but on documents that
    contain the trigger the hypothesis `'[' right after '='` explains it."""
    from acgraph.organism import load_config
    from acgraph.organism.language import documents

    subject, _, hyps = setup
    cfg = load_config()
    vocab = subject.vocab
    docs = documents(cfg.language, cfg.backdoor, 7, 16, 1.0)  # every document poisoned
    tokens = torch.zeros(16, 128, dtype=torch.long)
    for i, d in enumerate(docs):
        tokens[i, : len(d.tokens)] = torch.tensor([vocab[w] for w in d.tokens])
    trig = {t: h for t, h in hyps.items() if str(t) in ("L2/365", "L1/192")}
    local = {str(t): r for t, r in local_fidelity(subject, trig, [tokens], progress=False).items()}
    assert local["L2/365"]["fvu"] < 0.1 and local["L2/365"]["corr"] > 0.95
    assert local["L1/192"]["fvu"] < 0.2


def test_all_swapped_at_once_keep_the_organism_working(setup):
    subject, held, hyps = setup
    cost = swap_costs(subject, hyps, held, n_per_domain=25, progress=False)
    assert cost["acg_vs_acg"]["delta_ce"] < 0.05
    assert abs(cost["model_vs_original"]["delta_ce"]) < 0.05
    swapped = cost["organism"]["model_swapped"]
    assert min(swapped["domains"].values()) >= 0.9
    assert swapped["attack_success_rate"] >= 0.8  # the backdoor's read-out heads are modelled
