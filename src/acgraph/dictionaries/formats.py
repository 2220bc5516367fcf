"""File formats: the SAELens layout (save/load, tolerant of SAELens's own files) and
circuit-tracer transcoder sets (export/import).

SAELens layout (one folder per dictionary)::

    cfg.json                 {architecture, d_in, d_sae, [d_out], [k], dtype, device,
                              apply_b_dec_to_input, normalize_activations: "none",
                              metadata: {model_name, hook_name, [hook_name_out], context_size,
                                         prepend_bos, ...},
                              model_name, hook_name, ... (top-level copies of metadata),
                              acgraph: {format_version, config, ...}}   (our exact settings)
    sae_weights.safetensors  W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec,
                             [W_skip [d_out, d_in]], [threshold [d_sae]]

Architectures written (every one is registered in SAELens 6.54, so every file loads there):
SAEs ``standard`` (ReLU), ``jumprelu`` (JumpReLU, and BatchTopK, which SAELens also saves as
JumpReLU), ``topk``; transcoders ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
``jumprelu_skip_transcoder`` (SAELens names). A TopK transcoder with d_in == d_out and no skip
is written as ``topk`` (SAELens's TopKSAE then computes it exactly; the output hook is in
``metadata.hook_name_out``). SAELens 6.54 has no TopK transcoder or skip transcoder class, so
those cannot be expressed exactly: they are written as ``jumprelu_transcoder`` /
``jumprelu_skip_transcoder`` with a per-latent ``threshold`` (calibrated to TopK's firing
counts, :meth:`SparseDictionary.calibrate_topk_threshold_`; else the running per-token
cut-off), which SAELens runs as an approximation; acgraph reads the exact TopK from the
``acgraph`` block (files without it load as what their architecture says). Files from older
acgraph versions with ``topk_transcoder`` / ``topk_skip_transcoder`` still load here.

circuit-tracer transcoder set (one folder)::

    config.yaml   {model_kind: transcoder_set, feature_input_hook: ln2.hook_normalized,
                   feature_output_hook: hook_mlp_out, transcoders: [layer_0.safetensors, ...],
                   activation: relu | topk (+ k) | absent for JumpReLU}
    layer_{i}.safetensors   W_enc [d_sae, d_in]  (transposed w.r.t. SAELens!), W_dec [d_sae, d_out],
                            b_enc, b_dec, [W_skip [d_out, d_in]], [activation_function.threshold]

circuit-tracer 0.5.0 reads only the tensors of a layer file (``activation_function.threshold``
present: JumpReLU, else ReLU) and ignores ``activation``; export TopK dictionaries with
``topk_as_jumprelu=True`` (an approximation from the threshold tracked during training) when
they must run there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ArtifactError, ConfigError
from acgraph.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors
from acgraph.io import read_json as _read_json

from . import capped
from .config import DictionaryConfig
from .dictionary import SparseDictionary

FORMAT_VERSION = 1
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
CT_CONFIG = "config.yaml"

_ARCH = {
    ("sae", "relu"): "standard",
    ("sae", "jumprelu"): "jumprelu",
    ("sae", "batchtopk"): "jumprelu",
    ("sae", "topk"): "topk",
    ("transcoder", "relu"): "transcoder",
    ("transcoder", "jumprelu"): "jumprelu_transcoder",
    ("transcoder", "batchtopk"): "jumprelu_transcoder",
    ("transcoder", "topk"): "topk_transcoder",
    ("skip_transcoder", "relu"): "skip_transcoder",
    ("skip_transcoder", "jumprelu"): "jumprelu_skip_transcoder",
    ("skip_transcoder", "batchtopk"): "jumprelu_skip_transcoder",
    ("skip_transcoder", "topk"): "topk_skip_transcoder",
}

# architecture name (as SAELens and others write it) -> our activation
_ARCH_ACTIVATION = {
    "standard": "relu",
    "relu": "relu",
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu": "jumprelu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
    "batchtopk": "jumprelu",  # with a threshold; see _infer_config
    "topk": "topk",
    "topk_transcoder": "topk",
    "topk_skip_transcoder": "topk",
}


# ---------------------------------------------------------------- SAELens: save


# SAELens 6.54 has no TopK transcoder: written as a JumpReLU transcoder (approximation)
_SAELENS_TOPK_TRANSCODER = {
    "transcoder": "jumprelu_transcoder",
    "skip_transcoder": "jumprelu_skip_transcoder",
}


def saelens_architecture(cfg: DictionaryConfig) -> str:
    """The SAELens 6.54 ``architecture`` a dictionary is written as (see the module doc)."""
    if (cfg.kind, cfg.activation) == ("transcoder", "topk") and cfg.d_out == cfg.d_in:
        # SAELens 6.54 has no TopK transcoder class, but its TopKSAE computes exactly
        # topk(x @ W_enc + b_enc) @ W_dec + b_dec when apply_b_dec_to_input is False; the
        # transcoder nature is in metadata.hook_name_out.
        return "topk"
    if cfg.activation == "topk" and cfg.kind in _SAELENS_TOPK_TRANSCODER:
        return _SAELENS_TOPK_TRANSCODER[cfg.kind]
    return _ARCH[(cfg.kind, cfg.activation)]


def saelens_is_exact(cfg: DictionaryConfig) -> bool:
    """Whether SAELens 6.54 computes exactly what acgraph computes for this dictionary."""
    return not (cfg.activation == "topk" and saelens_architecture(cfg) != "topk")


def saelens_state_dict(dictionary: SparseDictionary) -> dict[str, Tensor]:
    """The tensors of ``sae_weights.safetensors`` (SAELens names and orientation)."""
    d = dictionary
    out = {
        "W_enc": d.W_enc.detach(),
        "b_enc": d.b_enc.detach(),
        "W_dec": d.W_dec.detach(),
        "b_dec": d.b_dec.detach(),
    }
    if d.W_skip is not None:
        out["W_skip"] = d.W_skip.detach()
    if d.threshold is not None:
        out["threshold"] = d.threshold.detach()
    elif not saelens_is_exact(d.cfg):  # TopK transcoder written as a SAELens JumpReLU one
        out["threshold"] = d.activation.jumprelu_threshold().expand(d.d_sae).detach()
    return {k: v.to(torch.float32).contiguous().cpu() for k, v in out.items()}


def saelens_cfg(dictionary: SparseDictionary, extra_metadata: dict[str, Any] | None = None):
    from acgraph import __version__

    cfg = dictionary.cfg
    metadata: dict[str, Any] = {
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_in,
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "exclude_special_tokens": True,
    }
    if cfg.kind != "sae":
        metadata["hook_name_out"] = cfg.hook_out
    metadata.update(extra_metadata or {})
    out: dict[str, Any] = {
        "architecture": saelens_architecture(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
    }
    if cfg.kind != "sae":
        out["d_out"] = cfg.d_out
    if cfg.activation == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    running = getattr(dictionary.activation, "running_threshold", None)
    log_space = getattr(dictionary.activation, "log_space", None)
    out.update(
        {
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": metadata,
        }
    )
    # Top-level copies: SAELens reads metadata from the top level for configs it takes for
    # pre-6.0 ones (those without a sae_lens_version), and other tools read them there too.
    out.update({k: v for k, v in metadata.items() if k != "hook_head_index"})
    out.update(
        {
            "acgraph": {
                "format_version": FORMAT_VERSION,
                "acgraph_version": __version__,
                "config": cfg.to_dict(),
                "running_threshold": None if running is None else float(running),
                "jumprelu_log_space": log_space,
            },
        }
    )
    if not saelens_is_exact(cfg):
        out["acgraph"]["saelens_approximation"] = (
            f"acgraph runs this file as TopK (k={cfg.k}); SAELens 6.54 has no TopK "
            f"{cfg.kind.replace('_', ' ')}, so it runs it as {out['architecture']} with the "
            "per-latent threshold in sae_weights.safetensors (an approximation of TopK)"
        )
    return out


def save_dictionary(
    dictionary: SparseDictionary,
    path: str | Path,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``dictionary`` to the folder ``path`` in the SAELens layout (atomically per file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path / WEIGHTS_FILENAME, saelens_state_dict(dictionary))
    atomic_write_json(path / CFG_FILENAME, saelens_cfg(dictionary, extra_metadata))
    return path


# ---------------------------------------------------------------- SAELens: load


def load_dictionary(
    path: str | Path, *, device: str | torch.device = "cpu", model: Any | None = None
) -> SparseDictionary:
    """Load a SAELens-layout folder (ours or SAELens's own, including pre-6.0 configs).

    With ``model`` the dictionary is checked against it (:func:`check_compatible`).
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"not a dictionary folder: {path}")
    raw = _read_json(path / CFG_FILENAME)
    if not isinstance(raw, dict):
        raise ArtifactError(f"malformed {path / CFG_FILENAME}: expected a JSON object")
    weights = load_tensors(path / WEIGHTS_FILENAME)
    where = str(path)
    if "acgraph" in raw:
        dictionary = _load_ours(raw, weights, where)
    else:
        dictionary = _load_foreign(raw, weights, where)
    dictionary = dictionary.to(device).eval()
    if model is not None:
        check_compatible(dictionary, model)
    return dictionary


def _load_ours(raw: dict[str, Any], weights: dict[str, Tensor], where: str) -> SparseDictionary:
    block = raw["acgraph"]
    if not isinstance(block, dict) or block.get("format_version") != FORMAT_VERSION:
        version = block.get("format_version") if isinstance(block, dict) else None
        raise ArtifactError(
            f"{where}/{CFG_FILENAME} has acgraph format_version {version!r}; this acgraph reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        cfg = DictionaryConfig.from_dict(block["config"])
    except (ConfigError, KeyError, TypeError) as err:
        raise ArtifactError(f"bad dictionary config in {where}/{CFG_FILENAME}: {err}") from None
    dictionary = SparseDictionary(cfg, seed=None, jumprelu_log_space=False)
    weights = dict(weights)
    latent = weights.pop("threshold", None) if cfg.activation == "topk" else None
    _assign_weights(dictionary, weights, where)
    running = block.get("running_threshold")
    if running is not None and hasattr(dictionary.activation, "running_threshold"):
        value = weights["threshold"][0] if "threshold" in weights else torch.tensor(running)
        dictionary.activation.running_threshold.copy_(value.to(torch.float32))
    if latent is not None:  # a TopK transcoder's JumpReLU export threshold
        if tuple(latent.shape) != (cfg.d_sae,):
            raise ArtifactError(
                f"{where}/{WEIGHTS_FILENAME}: threshold has shape {tuple(latent.shape)}, "
                f"expected ({cfg.d_sae},)"
            )
        dictionary.activation.latent_threshold = latent.to(torch.float32)  # type: ignore[union-attr]
    return dictionary


def _infer_config(raw: dict[str, Any], weights: dict[str, Tensor], where: str):
    """Turn a SAELens cfg.json (any version) into a DictionaryConfig; fix up the weights."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    arch = raw.get("architecture")
    act_fn = raw.get("activation_fn") or raw.get("activation_fn_str")
    k = raw.get("k")
    if k is None and isinstance(raw.get("activation_fn_kwargs"), dict):
        k = raw["activation_fn_kwargs"].get("k")
    if arch is None:  # pre-6.0 SAELens
        arch = "topk" if act_fn == "topk" else "standard"
    if arch not in _ARCH_ACTIVATION:
        raise ArtifactError(
            f"{where}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(sorted(_ARCH_ACTIVATION))})"
        )
    activation = _ARCH_ACTIVATION[arch]
    if "log_threshold" in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    if arch == "batchtopk" and "threshold" not in weights:
        if "topk_threshold" not in weights:
            raise ArtifactError(f"{where}: a batchtopk dictionary needs a threshold tensor")
        weights["threshold"] = (
            weights.pop("topk_threshold").reshape(()).expand(weights["b_enc"].shape[0]).clone()
        )
    if activation == "jumprelu" and "threshold" not in weights:
        raise ArtifactError(f"{where}: architecture {arch!r} needs a 'threshold' tensor")
    if activation == "topk" and k is None:
        raise ArtifactError(f"{where}: architecture {arch!r} needs 'k' in {CFG_FILENAME}")
    if "scaling_factor" in weights:
        factor = weights.pop("scaling_factor")
        if not torch.allclose(factor, torch.ones_like(factor)):
            raise ArtifactError(f"{where}: a non-trivial scaling_factor is not supported")
    normalize = raw.get("normalize_activations", "none")
    if normalize not in (None, "none"):
        raise ArtifactError(
            f"{where}: normalize_activations={normalize!r} is not supported (only 'none')"
        )
    if raw.get("reshape_activations", "none") not in (None, "none"):
        raise ArtifactError(f"{where}: reshape_activations is not supported")
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if key not in weights:
            raise ArtifactError(f"{where}/{WEIGHTS_FILENAME} lacks the tensor {key!r}")
    d_in, d_sae = weights["W_enc"].shape
    d_out = weights["W_dec"].shape[1]
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        stated = raw.get(key)
        if stated is not None and int(stated) != value:
            raise ArtifactError(
                f"{where}: {CFG_FILENAME} says {key}={stated} but W_enc has shape "
                f"{tuple(weights['W_enc'].shape)}"
            )
    if raw.get("rescale_acts_by_decoder_norm"):
        norms = weights["W_dec"].norm(dim=-1)
        weights["W_enc"] = weights["W_enc"] * norms
        weights["b_enc"] = weights["b_enc"] * norms
        weights["W_dec"] = weights["W_dec"] / norms[:, None]
    hook_in = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    hook_out = meta.get("hook_name_out") or raw.get("hook_name_out")
    if not hook_in:
        raise ArtifactError(f"{where}: {CFG_FILENAME} names no hook (metadata.hook_name)")
    if "W_skip" in weights:
        kind = "skip_transcoder"
    elif "transcoder" in arch or (hook_out and hook_out != hook_in) or d_out != d_in:
        kind = "transcoder"
    else:
        kind = "sae"
    if kind != "sae" and not hook_out:
        raise ArtifactError(f"{where}: a transcoder needs metadata.hook_name_out")
    apply_b_dec = bool(raw.get("apply_b_dec_to_input", kind == "sae"))
    if kind != "sae" and apply_b_dec:
        raise ArtifactError(f"{where}: apply_b_dec_to_input is not valid for a transcoder")
    context_size = meta.get("context_size", raw.get("context_size"))
    prepend_bos = meta.get("prepend_bos", raw.get("prepend_bos", True))
    try:
        return DictionaryConfig(
            kind=kind,
            d_in=int(d_in),
            d_sae=int(d_sae),
            d_out=int(d_out),
            hook_in=str(hook_in),
            hooks_out=[] if kind == "sae" else [str(hook_out)],
            activation=activation,
            k=int(k) if k is not None else None,
            apply_b_dec_to_input=apply_b_dec,
            model_name=meta.get("model_name") or raw.get("model_name"),
            context_size=int(context_size) if context_size is not None else None,
            prepend_bos=bool(prepend_bos) if prepend_bos is not None else True,
        )
    except ConfigError as err:
        raise ArtifactError(f"{where}: {err}") from None


def _load_foreign(raw: dict[str, Any], weights: dict[str, Tensor], where: str):
    weights = dict(weights)
    cfg = _infer_config(raw, weights, where)
    dictionary = SparseDictionary(cfg, seed=None, jumprelu_log_space=False)
    _assign_weights(dictionary, weights, where)
    return dictionary


def _assign_weights(dictionary: SparseDictionary, weights: dict[str, Tensor], where: str) -> None:
    cfg = dictionary.cfg
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_dec": (cfg.d_out,),
    }
    if cfg.has_skip:
        expected["W_skip"] = (cfg.d_out, cfg.d_in)
    if cfg.activation in ("jumprelu", "batchtopk"):
        expected["threshold"] = (cfg.d_sae,)
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ArtifactError(f"{where}/{WEIGHTS_FILENAME} has unexpected tensors {unexpected}")
    with torch.no_grad():
        for key, shape in expected.items():
            if key not in weights:
                raise ArtifactError(f"{where}/{WEIGHTS_FILENAME} lacks the tensor {key!r}")
            value = weights[key]
            if tuple(value.shape) != shape:
                raise ArtifactError(
                    f"{where}/{WEIGHTS_FILENAME}: {key} has shape {tuple(value.shape)} but the "
                    f"config (d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out}) needs {shape}"
                )
            value = value.to(torch.float32)
            if key == "threshold":
                act = dictionary.activation
                if cfg.activation == "jumprelu":
                    act.set_threshold(value)  # type: ignore[attr-defined]
                else:
                    act.running_threshold.copy_(value[0])  # type: ignore[union-attr]
            else:
                getattr(dictionary, key).copy_(value)


def from_hub(
    repo_id: str,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    model: Any | None = None,
) -> SparseDictionary:
    """Download ``cfg.json`` + ``sae_weights.safetensors`` from a Hugging Face repo (online)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with transformers
        raise ArtifactError(f"from_hub needs huggingface_hub: {err}") from None
    try:
        files = [
            hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision)
            for name in (CFG_FILENAME, WEIGHTS_FILENAME)
        ]
    except Exception as err:  # hub errors come in many types
        where = f"{repo_id}/{subfolder}" if subfolder else repo_id
        raise ArtifactError(f"cannot download a dictionary from {where}: {err}") from None
    return load_dictionary(Path(files[0]).parent, device=device, model=model)


# ---------------------------------------------------------------- compatibility


def hook_widths(model: Any, hooks: Sequence[str]) -> dict[str, int]:
    """Width (last dimension) of each hook, from a 2-token forward."""
    from .activation_stream import capture_hooks, check_hooks_exist

    check_hooks_exist(model, hooks)
    probe = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
    return {h: int(v.shape[-1]) for h, v in capture_hooks(model, probe, hooks).items()}


def check_compatible(dictionary: SparseDictionary, model: Any) -> None:
    """Refuse (ArtifactError) a dictionary whose hooks or widths do not match ``model``."""
    cfg = dictionary.cfg
    names = set(model.hook_dict)
    for hook in (cfg.hook_in, *cfg.hooks_out):
        if hook not in names:
            raise ArtifactError(
                f"dictionary {cfg.name!r} uses hook {hook!r}, which model "
                f"{model.cfg.model_name!r} ({model.cfg.n_layers} layers) does not have"
            )
    widths = hook_widths(model, [cfg.hook_in, *cfg.hooks_out])
    for side, hook, width in (("d_in", cfg.hook_in, cfg.d_in), ("d_out", cfg.hook_out, cfg.d_out)):
        if widths[hook] != width:
            raise ArtifactError(
                f"dictionary {cfg.name!r} has {side}={width} but model "
                f"{model.cfg.model_name!r} has width {widths[hook]} at {hook}"
            )


# ---------------------------------------------------------------- circuit-tracer


def _split_layer_hook(hook: str) -> tuple[int, str]:
    parts = hook.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ConfigError(f"hook {hook!r} is not a per-layer hook (blocks.<layer>.<name>)")
    return int(parts[1]), parts[2]


def export_circuit_tracer(
    dictionaries: Sequence[SparseDictionary],
    out_dir: str | Path,
    *,
    topk_as_jumprelu: bool = False,
    path_prefix: str = "",
    scan: str | None = None,
) -> Path:
    """Write per-layer transcoders as a circuit-tracer transcoder set.

    Needs one transcoder per layer 0..n-1, all reading ``blocks.L.<in>`` and writing
    ``blocks.L.<out>`` with the same ``<in>``/``<out>``, width, activation and skip-ness.
    ``path_prefix`` is put before each ``layer_{i}.safetensors`` in ``config.yaml`` (e.g.
    ``hf://owner/repo/`` when publishing). TopK is written as ``activation: topk`` + ``k``;
    ``topk_as_jumprelu=True`` writes the tracked threshold instead (see the module doc).
    """
    if not dictionaries:
        raise ConfigError("no transcoders to export")
    by_layer: dict[int, SparseDictionary] = {}
    suffixes: set[tuple[str, str]] = set()
    for d in dictionaries:
        cfg = d.cfg
        if cfg.kind not in ("transcoder", "skip_transcoder"):
            raise ConfigError(f"{cfg.name!r} is a {cfg.kind}; circuit-tracer sets hold transcoders")
        layer_in, suffix_in = _split_layer_hook(cfg.hook_in)
        layer_out, suffix_out = _split_layer_hook(cfg.hook_out)
        if layer_in != layer_out:
            raise ConfigError(f"{cfg.name!r} reads layer {layer_in} but writes layer {layer_out}")
        if layer_in in by_layer:
            raise ConfigError(f"two transcoders for layer {layer_in}")
        by_layer[layer_in] = d
        suffixes.add((suffix_in, suffix_out))
    if len(suffixes) != 1:
        raise ConfigError(f"transcoders use different hooks: {sorted(suffixes)}")
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ConfigError(f"need transcoders for layers 0..n-1, got layers {sorted(by_layer)}")
    ordered = [by_layer[i] for i in range(len(by_layer))]
    first = ordered[0].cfg
    for d in ordered[1:]:
        c = d.cfg
        if (c.d_sae, c.activation, c.k if c.activation == "topk" else None, c.has_skip) != (
            first.d_sae,
            first.activation,
            first.k if first.activation == "topk" else None,
            first.has_skip,
        ):
            raise ConfigError(
                "all transcoders of a set need the same width, activation (and k) and skip-ness"
            )
    suffix_in, suffix_out = suffixes.pop()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    as_jumprelu = first.activation in ("jumprelu", "batchtopk") or (
        first.activation == "topk" and topk_as_jumprelu
    )
    for i, d in enumerate(ordered):
        tensors = {
            "W_enc": d.W_enc.detach().T.contiguous(),
            "W_dec": d.W_dec.detach(),
            "b_enc": d.b_enc.detach(),
            "b_dec": d.b_dec.detach(),
        }
        if d.W_skip is not None:
            tensors["W_skip"] = d.W_skip.detach()
        if as_jumprelu:
            theta = d.activation.jumprelu_threshold()
            if theta is None or (theta.dim() == 0 and float(theta) < 0):
                raise ConfigError(f"{d.cfg.name!r} has no threshold estimate to export")
            tensors["activation_function.threshold"] = theta.expand(d.d_sae).contiguous()
        tensors = {k: v.float().cpu() for k, v in tensors.items()}
        atomic_save_tensors(out / f"layer_{i}.safetensors", tensors)
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "feature_input_hook": suffix_in,
        "feature_output_hook": suffix_out,
        "transcoders": [f"{path_prefix}layer_{i}.safetensors" for i in range(len(ordered))],
    }
    if not as_jumprelu:
        config["activation"] = "relu" if first.activation == "relu" else "topk"
        if first.activation == "topk":
            config["k"] = int(first.k)  # type: ignore[arg-type]
    if scan is not None:
        config["scan"] = scan
    if first.model_name:
        config["model_name"] = first.model_name
    config["acgraph_format_version"] = FORMAT_VERSION
    import yaml

    atomic_write_text(out / CT_CONFIG, yaml.safe_dump(config, sort_keys=False))
    return out


def load_circuit_tracer(folder: str | Path, *, device: str | torch.device = "cpu"):
    """Read a circuit-tracer transcoder set folder (``model_kind: transcoder_set``)."""
    import yaml

    folder = Path(folder)
    path = folder / CT_CONFIG
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ArtifactError(f"unreadable {path}: {err}") from None
    if not isinstance(config, dict) or config.get("model_kind") != "transcoder_set":
        raise ArtifactError(f"{path}: only model_kind 'transcoder_set' is supported")
    files = config.get("transcoders") or [
        p.name for p in sorted(folder.glob("layer_*.safetensors"), key=lambda p: int(p.stem[6:]))
    ]
    result = []
    for layer, name in enumerate(files):
        local = folder / Path(str(name).split("/")[-1])
        weights = load_tensors(local)
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            if key not in weights:
                raise ArtifactError(f"{local} lacks the tensor {key!r}")
        d_sae, d_in = weights["W_enc"].shape
        jump = "activation_function.threshold" in weights
        activation = "jumprelu" if jump else config.get("activation", "relu")
        cfg = DictionaryConfig(
            kind="skip_transcoder" if "W_skip" in weights else "transcoder",
            d_in=int(d_in),
            d_sae=int(d_sae),
            d_out=int(weights["W_dec"].shape[1]),
            hook_in=f"blocks.{layer}.{config['feature_input_hook']}",
            hooks_out=[f"blocks.{layer}.{config['feature_output_hook']}"],
            activation=activation,
            k=config.get("k"),
            model_name=config.get("model_name"),
        )
        mapped = {
            "W_enc": weights["W_enc"].T.contiguous(),
            "W_dec": weights["W_dec"],
            "b_enc": weights["b_enc"],
            "b_dec": weights["b_dec"],
        }
        if "W_skip" in weights:
            mapped["W_skip"] = weights["W_skip"]
        if jump:
            mapped["threshold"] = weights["activation_function.threshold"]
        d = SparseDictionary(cfg, seed=None, jumprelu_log_space=False)
        _assign_weights(d, mapped, str(local))
        result.append(d.to(device).eval())
    return result


def load_transcoder_folder(source: str | Path) -> list[SparseDictionary]:
    """Every transcoder in a folder, in eval mode: a circuit-tracer set (``config.yaml``) or
    SAELens-layout subfolders (``*/cfg.json``; SAEs skipped), a capped set written by `acg clean`
    or `acg distill` (:mod:`.capped`); ``"organism"`` for the ones shipped with the organism."""
    if str(source) == "organism":
        from acgraph.organism import shipped_transcoders_dir

        source = shipped_transcoders_dir()
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ArtifactError(f"no transcoder folder at {folder}")
    if (folder / "config.yaml").is_file():
        dicts = load_circuit_tracer(folder)
    elif capped.is_capped_set(folder):
        dicts = load_transcoder_folder(folder / capped.SUBFOLDER)
        capped.apply_ceilings(dicts, folder)
    else:
        subs = sorted(p for p in folder.iterdir() if (p / "cfg.json").is_file())
        if not subs:
            raise ArtifactError(
                f"{folder} holds no transcoders: neither a circuit-tracer set (config.yaml), "
                "SAELens-layout folders (*/cfg.json) nor an `acg clean`/`acg distill` output"
            )
        dicts = [d for d in (load_dictionary(p) for p in subs) if d.cfg.kind != "sae"]
    for d in dicts:
        d.eval()
        d.requires_grad_(False)
    return dicts
