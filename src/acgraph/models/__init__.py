"""Load supported causal LMs as TransformerLens HookedTransformers and describe them.

The one place in acgraph that knows about architectures; everything downstream speaks
TransformerLens hook names (`blocks.3.hook_mlp_out`, ...).
"""

from .configs import ARCHITECTURES, architecture_name, hooked_config
from .load import attach_tokenizer, hooked_from_hf, load_hf_model, load_model
from .spec import ModelSpec, resolve_spec
from .summary import (
    LAYER_HOOKS,
    count_parameters,
    format_model_info,
    hook_points,
    model_info,
    model_summary,
)

__all__ = [
    "ARCHITECTURES",
    "LAYER_HOOKS",
    "ModelSpec",
    "architecture_name",
    "attach_tokenizer",
    "count_parameters",
    "format_model_info",
    "hook_points",
    "hooked_config",
    "hooked_from_hf",
    "load_hf_model",
    "load_model",
    "model_info",
    "model_summary",
    "resolve_spec",
]
