"""The global ACG: input-independent sparse edges between features, and the runnable graph.

layout.py        sites, source groups and channels (where every node lives)
weights.py       virtual weights from the model and its transcoders
forward.py       ACGModel: logits from graph nodes and kept edges only
attention_bounds.py  per-head caps on attention between token pairs (cleaned graphs)
stats.py         edge statistics over a corpus (means for ranking and folding)
prune.py         top-k in-edges per feature, top query-key pairs per head
build.py         build / save / load (the workspace's acg/ folder)
faithfulness.py  CE, KL, top-1 agreement, CE recovered vs the original model
explain.py       a feature's formula and its R² on data
"""

from .attention_bounds import AttentionBounds
from .build import ACGraph, TranscoderSet, build_acg, load_acg, load_transcoders
from .explain import explain_feature, parse_feature
from .faithfulness import format_faithfulness, measure_faithfulness, plot_faithfulness
from .forward import ACGModel, Replacement, Trace
from .weights import ModelWeights

__all__ = [
    "ACGModel",
    "ACGraph",
    "AttentionBounds",
    "ModelWeights",
    "Replacement",
    "Trace",
    "TranscoderSet",
    "build_acg",
    "explain_feature",
    "format_faithfulness",
    "load_acg",
    "load_transcoders",
    "measure_faithfulness",
    "parse_feature",
    "plot_faithfulness",
]
