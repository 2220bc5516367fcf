"""Hypotheses as code, swapped into the runnable ACG or the real model, and the
understanding-coverage report.

core.py       targets, the @feature / @head / @component decorators, the Context a hypothesis reads
loader.py     load hypothesis files (only from paths the user names: they are code)
swap.py       swap hypotheses into the ACG (a Replacement) or the real model (hooks)
fidelity.py   local fidelity: FVU, correlation, precision/recall of firing, pattern overlap
evaluate.py   `acg hypothesis test`: local fidelity, swap costs, verdicts
families.py   built-in families, fitted automatically and written out as editable Python
coverage.py   per-layer coverage, "understood up to layer L", JSON + Markdown + PNG
"""

from .core import Context, Hypothesis, Target, component, feature, head, zero
from .evaluate import Subject, Thresholds, evaluate_hypotheses, format_test
from .loader import load_file, load_hypotheses

__all__ = [
    "Context",
    "Hypothesis",
    "Subject",
    "Target",
    "Thresholds",
    "component",
    "evaluate_hypotheses",
    "feature",
    "format_test",
    "head",
    "load_file",
    "load_hypotheses",
    "zero",
]
