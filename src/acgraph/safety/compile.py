"""Compile a level-1 ACG back into an ordinary network (`acg compile`): a GPT-2 for
LayerNorm models with learned positions, a Llama for RMSNorm + rotary models
(compile_llama.py; the MLP units below are the same in both).

Each MLP of the compiled network *is* the layer's transcoder:

- ``ln_2`` gets weight 1 and bias 0, so the MLP reads exactly the transcoder's input
  ``blocks.L.ln2.hook_normalized`` (GPT-2 LayerNorm and TransformerLens share the eps).
- feature units: ``c_fc`` columns are encoder columns, ``c_proj`` rows decoder rows, activation
  ReLU (``activation_function="relu"``). A TopK transcoder is not expressible by a per-unit
  activation (its cut-off depends on the other units), so three constructions are offered:

  ``relu``      ReLU(z): every positive pre-activation fires (more features than TopK).
  ``shift``     ReLU(z - θ): fires like a JumpReLU with per-feature threshold θ, but writes
                z - θ instead of z.
  ``jumprelu``  (default) a JumpReLU z·H(z - θ) from two ReLU units per feature:
                (1 - θ/ε)·ReLU(z - θ) + (θ/ε)·ReLU(z - θ + ε), exact outside (θ - ε, θ).

  θ is calibrated so each feature fires as often as under TopK on calibration data
  (:func:`calibrate_thresholds`). A ReLU or JumpReLU transcoder compiles exactly (up to ε).
- the skip path ``W_skip·n`` is linear; ReLU pairs make it exact: n = ReLU(n) - ReLU(-n).
- the BOS node: the ACG pins position 0 to the real model's BOS residual. One extra unit per
  layer points at the normalized BOS input (every normalized vector has norm √d, so a unit
  ReLU(u·n - τ) with u the BOS direction fires only on inputs nearly parallel to it) and writes
  the difference, so position 0 is exact too; τ sits above every non-BOS position seen in
  calibration (reported as ``bos_margin``).
- removed features (a cleaned or distilled graph) are simply absent units.
- a cleaned graph's attention mask (key-previous kind, mask mode) becomes a block in front of
  the model's and a wider residual stream (compile_mask.py); other attention bounds do not
  compile and are reported as such.

Layers have different unit counts; the network needs one MLP width, so short layers are padded with
zero units (``effective_parameters`` counts only non-zero MLP weights).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from acgraph.data.contexts import valid_positions
from acgraph.dictionaries.metrics import CONFIDENT_P
from acgraph.errors import ArtifactError, ConfigError

from .compile_llama import check_llama, llama_network
from .compile_mask import compile_key_previous_mask

MODES = ("jumprelu", "shift", "relu")


@dataclass
class CompiledMLP:
    """One compiled MLP: ``out = relu(n @ W_in + b_in) @ W_out + b_out``."""

    W_in: Tensor  # [d, n_units]
    b_in: Tensor  # [n_units]
    W_out: Tensor  # [n_units, d]
    b_out: Tensor  # [d]
    n_feature_units: int
    n_skip_units: int
    n_bos_units: int

    def __call__(self, n: Tensor) -> Tensor:
        return torch.relu(n @ self.W_in + self.b_in) @ self.W_out + self.b_out

    @property
    def n_units(self) -> int:
        return self.W_in.shape[1]


@dataclass
class CompileResult:
    model: Any  # transformers.GPT2LMHeadModel or LlamaForCausalLM
    mlps: list[CompiledMLP]
    info: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[int, Tensor] = field(default_factory=dict)  # what stood in for TopK


# ---------------------------------------------------------------- thresholds


@torch.no_grad()
def calibrate_thresholds(acg: Any, batches: Sequence[Tensor], pad_token_id: int | None = 0):
    """Per-feature thresholds θ ``{layer: [d_sae]}`` such that ``pre > θ`` fires as often as the
    ACG's own activation on ``batches`` (the midpoint between the c-th and (c+1)-th largest
    pre-activation, c = the feature's firing count; never-firing features get their maximum).
    Also returns, per layer, the largest cosine of a non-BOS normalized MLP input with the BOS
    one (used to place the BOS unit's cut-off)."""
    pres: dict[int, list[Tensor]] = {}
    fired: dict[int, Tensor] = {}
    for tokens in batches:
        trace = acg.run(tokens)
        mask = valid_positions(tokens, pad_token_id)  # BOS: the pinned bos node
        for layer, (pre, acts) in enumerate(zip(trace.pre, trace.acts, strict=True)):
            pres.setdefault(layer, []).append(pre[mask])
            c = (acts[mask] > 0).sum(0)
            fired[layer] = fired.get(layer, 0) + c
    thresholds = {}
    for layer, chunks in pres.items():
        pre = torch.cat(chunks)  # [N, d_sae]
        n = pre.shape[0]
        c = fired[layer].clamp(max=n)
        top = int(min(n, int(c.max()) + 1))
        ranked = pre.T.topk(top, dim=-1).values  # [d_sae, top] descending
        above = ranked.gather(1, (c - 1).clamp(0, top - 1)[:, None])[:, 0]
        below = ranked.gather(1, c.clamp(max=top - 1)[:, None])[:, 0]
        mid = torch.where(c == 0, ranked[:, 0], (above + below) / 2)
        mid = torch.where(c >= n, torch.zeros_like(mid), mid)
        thresholds[layer] = mid.clamp(min=0)
    return thresholds


def transcoder_thresholds(tc: Any) -> Tensor | None:
    """The threshold a transcoder itself defines (JumpReLU/BatchTopK, or a TopK calibrated for
    export), or None."""
    t = tc.threshold
    if t is not None:
        return t.detach()
    latent = getattr(tc.activation, "latent_threshold", None)
    return latent.detach() if latent is not None else None


# ---------------------------------------------------------------- one MLP


def compile_mlp(
    weights: Any,
    layer: int,
    *,
    mode: str = "jumprelu",
    threshold: Tensor | None = None,
    ramp: float = 1e-4,
    keep: Tensor | None = None,
) -> CompiledMLP:
    """The ReLU MLP that stands for transcoder ``layer`` of ``weights`` (a ModelWeights);
    ``keep`` (bool [d_sae]) drops the other features' units."""
    if mode not in MODES:
        raise ConfigError(f"unknown compile mode {mode!r}; use one of {', '.join(MODES)}")
    tc = weights.transcoders[layer]
    act = tc.cfg.activation
    W_enc = tc.W_enc.detach()
    W_dec = tc.W_dec.detach()
    bias = weights.target_bias(layer).detach()
    d = W_enc.shape[0]
    if keep is None:
        keep = torch.ones(W_enc.shape[1], dtype=torch.bool)
    idx = keep.nonzero()[:, 0]
    W_enc, W_dec, bias = W_enc[:, idx], W_dec[idx], bias[idx]
    if act == "relu":
        theta = torch.zeros(len(idx), dtype=W_enc.dtype)
        mode = "relu"  # a ReLU transcoder is its own exact compilation
    else:
        if threshold is None and mode != "relu":
            threshold = transcoder_thresholds(tc)
            if threshold is None:
                raise ConfigError(
                    f"layer {layer}: a {act} transcoder needs thresholds for mode {mode!r} "
                    "(calibrate_thresholds, or mode='relu')"
                )
        theta = (
            threshold[idx].to(W_enc) if threshold is not None else torch.zeros(len(idx)).to(W_enc)
        )
    ceiling = getattr(tc.activation, "ceiling", None)
    M = None
    if ceiling is not None:
        if len(ceiling) != tc.d_sae:
            raise ConfigError(f"layer {layer}: activation ceiling has the wrong size")
        M = ceiling.detach()[idx].to(W_enc)
    if mode == "relu":
        fc_w, fc_b, proj = W_enc, bias, W_dec
    elif mode == "shift":
        fc_w, fc_b, proj = W_enc, bias - theta, W_dec
    else:
        # JumpReLU from two ReLUs: a ramp of width ε below θ, then exactly z above θ. With a
        # cap M below θ the feature is a pure step of height M (no linear part).
        eps = torch.full_like(theta, ramp)
        linear = torch.ones_like(theta) if M is None else (theta <= M).to(theta)
        height = theta if M is None else torch.minimum(theta, M)
        b = (height / eps)[:, None]
        a = linear[:, None] - b
        fc_w = torch.cat([W_enc, W_enc], 1)
        fc_b = torch.cat([bias - theta, bias - theta + eps])
        proj = torch.cat([a * W_dec, b * W_dec])
    if M is not None:
        # min(a, M) = a - ReLU(z - M) wherever a = z (above the threshold); nothing to cut
        # where the cap is below the threshold (that feature is already a step of height M)
        cut = torch.ones_like(M) if mode != "jumprelu" else (theta <= M).to(M)
        fc_w = torch.cat([fc_w, W_enc], 1)
        fc_b = torch.cat([fc_b, bias - M])
        proj = torch.cat([proj, -cut[:, None] * W_dec])
    n_feat = fc_w.shape[1]
    parts_w, parts_b, parts_p = [fc_w], [fc_b], [proj]
    n_skip = 0
    if tc.W_skip is not None:
        eye = torch.eye(d, dtype=W_enc.dtype)
        S = tc.W_skip.detach().T  # [d_in, d_out]
        parts_w += [eye, -eye]
        parts_b += [torch.zeros(2 * d, dtype=W_enc.dtype)]
        parts_p += [S, -S]
        n_skip = 2 * d
    mlp = CompiledMLP(
        torch.cat(parts_w, 1).contiguous(),
        torch.cat(parts_b).contiguous(),
        torch.cat(parts_p).contiguous(),
        tc.b_dec.detach().clone(),
        n_feat,
        n_skip,
        0,
    )
    return mlp


def _normalize(weights: Any, x: Tensor) -> Tensor:
    """``x`` through the model's norm without its weight (LayerNorm or RMSNorm)."""
    return weights.center(x) / weights.scale(x)[..., None]


def add_bos_unit(
    mlp: CompiledMLP, weights: Any, layer: int, max_cos: float
) -> tuple[CompiledMLP, float]:
    """Add the unit that makes the BOS position write what the real MLP writes there.
    Returns the new MLP and the margin (1 - cut-off cosine); no unit when ``max_cos`` leaves no
    room (margin <= 0)."""
    n0 = _normalize(weights, weights.bos_resid[2 * layer + 1])
    norm = float(n0.norm())
    margin = 1.0 - max_cos
    if margin <= 1e-4:
        return mlp, margin
    cut = max_cos + margin / 2  # halfway between the nearest data point and BOS itself
    u = n0 / norm
    want = weights.bos_resid[2 * layer + 2] - weights.bos_resid[2 * layer + 1]
    delta = want - mlp(n0)
    height = norm * (1 - cut)  # the unit's value at BOS
    return (
        CompiledMLP(
            torch.cat([mlp.W_in, u[:, None]], 1),
            torch.cat([mlp.b_in, torch.tensor([-norm * cut], dtype=mlp.b_in.dtype)]),
            torch.cat([mlp.W_out, (delta / height)[None]]),
            mlp.b_out,
            mlp.n_feature_units,
            mlp.n_skip_units,
            1,
        ),
        margin,
    )


@torch.no_grad()
def bos_cosines(acg: Any, batches: Sequence[Tensor], pad_token_id: int | None = 0) -> list[float]:
    """Per layer, the largest cosine between a non-BOS MLP input and the BOS one."""
    w = acg.w
    best = [-1.0] * acg.layout.n_layers
    for tokens in batches:
        trace = acg.run(tokens, keep_resid=True)
        mask = valid_positions(tokens, pad_token_id)
        for layer in range(acg.layout.n_layers):
            n = _normalize(w, trace.resid[2 * layer + 1][mask])
            n0 = _normalize(w, w.bos_resid[2 * layer + 1])
            cos = (n @ n0) / (n.norm(dim=-1) * n0.norm()).clamp(min=1e-12)
            if cos.numel():
                best[layer] = max(best[layer], float(cos.max()))
    return best


# ---------------------------------------------------------------- whole network


def _gpt2_config(model: Any, n_inner: int):
    from transformers import GPT2Config

    cfg = model.cfg
    tok = getattr(model, "tokenizer", None)
    return GPT2Config(
        vocab_size=cfg.d_vocab,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=n_inner,
        activation_function="relu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=float(cfg.eps),
        bos_token_id=getattr(tok, "bos_token_id", None),
        eos_token_id=getattr(tok, "eos_token_id", None),
        pad_token_id=getattr(tok, "pad_token_id", None),
        tie_word_embeddings=False,
    )


def _check_gpt2(model: Any) -> None:
    cfg = model.cfg
    if cfg.normalization_type != "LN" or cfg.positional_embedding_type != "standard":
        raise ArtifactError(
            "compile writes GPT-2 networks: the model needs LayerNorm and learned positions "
            f"(got {cfg.normalization_type}, {cfg.positional_embedding_type})"
        )
    if cfg.d_head * cfg.n_heads != cfg.d_model:
        raise ArtifactError("compile needs d_head * n_heads == d_model (GPT-2 layout)")
    if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
        raise ArtifactError("compile does not support grouped-query attention")
    if float(model.blocks[0].attn.attn_scale) != math.sqrt(cfg.d_head):
        raise ArtifactError("compile needs attention scaled by sqrt(d_head) (GPT-2)")


def _gpt2_network(model: Any, w: Any, mlps: list[CompiledMLP], n_inner: int) -> Any:
    """The model's embeddings, attention and norms, with ``mlps`` as its MLPs, as GPT-2."""
    from transformers import GPT2LMHeadModel

    cfg = _gpt2_config(model, n_inner)
    net = GPT2LMHeadModel(cfg).eval()
    d, H, dh = model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head
    sd = net.state_dict()
    sd["transformer.wte.weight"] = w.W_E.clone()
    sd["transformer.wpe.weight"] = w.W_pos.clone()
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        attn = block.attn
        sd[p + "ln_1.weight"] = block.ln1.w.clone()
        sd[p + "ln_1.bias"] = block.ln1.b.clone()
        qkv = [getattr(attn, f"W_{n}").detach().permute(1, 0, 2).reshape(d, H * dh) for n in "QKV"]
        sd[p + "attn.c_attn.weight"] = torch.cat(qkv, 1)
        sd[p + "attn.c_attn.bias"] = torch.cat(
            [getattr(attn, f"b_{n}").detach().reshape(-1) for n in "QKV"]
        )
        sd[p + "attn.c_proj.weight"] = attn.W_O.detach().reshape(H * dh, d).clone()
        sd[p + "attn.c_proj.bias"] = attn.b_O.detach().clone()
        sd[p + "ln_2.weight"] = torch.ones(d)
        sd[p + "ln_2.bias"] = torch.zeros(d)
        m = mlps[i]
        pad = n_inner - m.n_units
        sd[p + "mlp.c_fc.weight"] = F.pad(m.W_in, (0, pad))
        sd[p + "mlp.c_fc.bias"] = F.pad(m.b_in, (0, pad), value=-1.0)  # padding never fires
        sd[p + "mlp.c_proj.weight"] = F.pad(m.W_out, (0, 0, 0, pad))
        sd[p + "mlp.c_proj.bias"] = m.b_out.clone()
    sd["transformer.ln_f.weight"] = model.ln_final.w.detach().clone()
    sd["transformer.ln_f.bias"] = model.ln_final.b.detach().clone()
    sd["lm_head.weight"] = model.W_U.detach().T.clone()
    net.load_state_dict(sd)
    return net.requires_grad_(False)


@torch.no_grad()
def compile_acg(
    acg: Any,
    *,
    mode: str = "jumprelu",
    thresholds: dict[int, Tensor] | None = None,
    keep: dict[int, Tensor] | None = None,
    calibration: Sequence[Tensor] = (),
    ramp: float = 1e-4,
    bos_fix: bool = True,
) -> CompileResult:
    """Compile a level-1 ``ACGModel`` (every MLP = its transcoder, exact attention) into a
    ``transformers.GPT2LMHeadModel``, or a ``LlamaForCausalLM`` for RMSNorm + rotary models.
    ``calibration`` (token batches starting with BOS) sets the TopK thresholds (when
    ``thresholds`` is None) and the BOS unit's cut-off. A cleaned ACG's attention bounds
    compile where they are a key-previous mask on GPT-2 (compile_mask.py); any other kind is
    not expressible and is left out (``info``)."""

    if acg.edges or acg.qk:
        raise ConfigError(
            "only a level-1 ACG (all edges, exact attention) compiles to a dense network; "
            "pruned edges and QK pairs are not expressible as dense weights"
        )
    w = acg.w
    model = w.model
    if w.rms:
        check_llama(model)
    else:
        _check_gpt2(model)
    if float(model.b_U.detach().abs().max()) > 0:
        raise ArtifactError("compile cannot express an unembedding bias (GPT-2, Llama have none)")
    L = acg.layout.n_layers
    if model.cfg.n_layers != L:
        raise ConfigError("compile needs a transcoder for every layer")
    needs_theta = mode != "relu" and any(
        tc.cfg.activation != "relu" and transcoder_thresholds(tc) is None for tc in w.transcoders
    )
    if thresholds is None and needs_theta:
        if not calibration:
            raise ConfigError("TopK transcoders need calibration batches to set thresholds")
        thresholds = calibrate_thresholds(acg, calibration)
    thresholds = dict(thresholds or {})
    for i, tc in enumerate(w.transcoders):  # record what stands in for each TopK
        if i not in thresholds and tc.cfg.activation in ("topk", "batchtopk"):
            own = transcoder_thresholds(tc)
            if own is not None:
                thresholds[i] = own
    mlps = [
        compile_mlp(
            w,
            i,
            mode=mode,
            threshold=thresholds.get(i),
            ramp=ramp,
            keep=None if keep is None else keep.get(i),
        )
        for i in range(L)
    ]
    margins: list[float | None] = [None] * L
    if bos_fix and w.bos_resid is not None and calibration:
        # the BOS unit's cut-off needs data: without calibration, position 0 is approximate
        cos = bos_cosines(acg, calibration)
        for i in range(L):
            mlps[i], margins[i] = add_bos_unit(mlps[i], w, i, cos[i])
    n_inner = max(m.n_units for m in mlps)
    net = llama_network(model, mlps, n_inner) if w.rms else _gpt2_network(model, w, mlps, n_inner)
    bounds = w.attention_bounds
    # the flag block needs learned positions: masks compile on GPT-2 only
    mask = bounds is not None and (bounds.kind, bounds.mode) == ("key-previous", "mask")
    mask_compiles = mask and not w.rms
    if mask_compiles:
        if not calibration:
            raise ConfigError("compiling an attention mask needs calibration batches")
        net = compile_key_previous_mask(net, bounds, list(calibration))
    mlp_params = sum(
        int((m.W_in != 0).sum() + (m.b_in != 0).sum() + (m.W_out != 0).sum()) for m in mlps
    )
    info = {
        "mode": mode,
        "ramp": ramp if mode == "jumprelu" else None,
        "architecture": type(net).__name__,
        # MLP width: wider where a mask compiled (GPT-2 n_inner, Llama intermediate_size)
        "n_inner": getattr(net.config, "n_inner", None) or net.config.intermediate_size,
        "units": [
            {
                "features": m.n_feature_units,
                "skip": m.n_skip_units,
                "bos": m.n_bos_units,
            }
            for m in mlps
        ],
        "features_kept": [
            int(keep[i].sum()) if keep is not None and i in keep else w.transcoders[i].d_sae
            for i in range(L)
        ],
        "bos_margin": margins,
        "parameters": sum(p.numel() for p in net.parameters()),
        "nonzero_parameters": sum(int((p != 0).sum()) for p in net.parameters()),
        "effective_mlp_parameters": mlp_params,
        "original_parameters": sum(p.numel() for p in model.parameters()),
        # GPT-2 attention is softmax(q·k) with nothing after it: a cap on the pattern, or a
        # gate on the token after the key, has no construction there; a key-previous mask does
        "attention_bounds": _bounds_note(bounds, mask_compiles),
    }
    return CompileResult(net, mlps, info, thresholds)


def _bounds_note(bounds: Any, compiled: bool) -> str | None:
    if bounds is None:
        return None
    if compiled:
        return "compiled (key-previous mask: a flag block in front, compile_mask.py)"
    return "not compiled"


def save_compiled(result: CompileResult, tokenizer: Any, folder: str | Path) -> Path:
    """Write an HF folder (config.json, model.safetensors, tokenizer files, compile.json);
    written to a temporary sibling and renamed, so a crash never leaves half a model."""
    from acgraph.io import atomic_write_json

    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        result.model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "compile.json", {"format_version": 1, **result.info})
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------- agreement


@torch.no_grad()
def agreement(
    reference: Any, other: Any, batches: Sequence[Tensor], pad_token_id: int | None = 0
) -> dict[str, float]:
    """Top-1 agreement and KL(reference ‖ other) over non-pad positions (BOS included); both
    arguments map tokens ``[B, T]`` to logits."""
    same = total = sure_same = sure = 0
    kl_sum = 0.0
    max_abs = 0.0
    for tokens in batches:
        a = reference(tokens).double()
        b = other(tokens).double()
        mask = valid_positions(tokens, pad_token_id, bos=True)
        la, lb = a.log_softmax(-1)[mask], b.log_softmax(-1)[mask]
        match = la.argmax(-1) == lb.argmax(-1)
        same += int(match.sum())
        total += int(mask.sum())
        # positions where the reference is confident: top-1 is not a near-tie
        confident = la.max(-1).values > math.log(CONFIDENT_P)
        sure_same += int(match[confident].sum())
        sure += int(confident.sum())
        kl_sum += float((la.exp() * (la - lb)).sum())
        max_abs = max(max_abs, float((a - b)[mask].abs().max()))
    return {
        "top1_agreement": same / max(total, 1),
        "top1_agreement_confident": sure_same / max(sure, 1),
        "confident_positions": sure,
        "kl": kl_sum / max(total, 1),
        "max_abs_logit_diff": max_abs,
        "positions": total,
    }


def hf_logits(net: Any):
    """``tokens -> logits`` for an HF causal LM (right padding is harmless: causal attention)."""

    @torch.no_grad()
    def run(toks: Tensor) -> Tensor:
        return net(toks, attention_mask=torch.ones_like(toks)).logits

    return run


# ---------------------------------------------------------------- transcoder surgery


@torch.no_grad()
def derive_transcoder(tc: Any, *, keep: Tensor | None = None, threshold: Tensor | None = None):
    """A copy of ``tc`` keeping only the features in ``keep`` (bool [d_sae]) and, with
    ``threshold``, turned into a JumpReLU ``z·H(z - θ)`` (which compiles exactly)."""
    import dataclasses

    from acgraph.dictionaries.dictionary import SparseDictionary

    if keep is None:
        keep = torch.ones(tc.d_sae, dtype=torch.bool)
    idx = keep.nonzero()[:, 0]
    if len(idx) == 0:
        raise ConfigError(f"{tc.cfg.hook_out}: cannot keep zero features")
    changes: dict[str, Any] = {"d_sae": len(idx)}
    if threshold is not None:
        changes.update(activation="jumprelu", k=None)
    elif tc.cfg.activation in ("topk", "batchtopk"):
        changes["k"] = min(int(tc.cfg.k), len(idx))
    cfg = dataclasses.replace(tc.cfg, **changes)
    new = SparseDictionary(cfg, jumprelu_log_space=False)
    new.W_enc.copy_(tc.W_enc[:, idx])
    new.b_enc.copy_(tc.b_enc[idx])
    new.W_dec.copy_(tc.W_dec[idx])
    new.b_dec.copy_(tc.b_dec)
    if tc.W_skip is not None:
        new.W_skip.copy_(tc.W_skip)
    if threshold is not None:
        new.activation.set_threshold(threshold[idx].to(new.W_enc))
    elif tc.threshold is not None and cfg.activation == "jumprelu":
        new.activation.set_threshold(tc.threshold[idx])
    return new.eval()
