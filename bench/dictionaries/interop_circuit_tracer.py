"""Check that a circuit-tracer transcoder set written by acgraph loads and runs in circuit-tracer
(runs in bench/peers/circuit_tracer: circuit-tracer 0.5.0, transformers 4.57).

    bench/peers/circuit_tracer/bin/python bench/dictionaries/interop_circuit_tracer.py \
        --transcoders DIR --model-dir HF_DIR [--reference REF.safetensors] \
        [--prompt-tokens TOKENS.safetensors] --out result.json

``DIR`` holds ``config.yaml`` (``model_kind: transcoder_set``, ``feature_input_hook``,
``feature_output_hook``, ``transcoders: [layer_0.safetensors, ...]``) and the per-layer files.
The set is loaded the way circuit-tracer loads a local set (``load_transcoders(config)`` from
``circuit_tracer.utils.hf_utils``, with the layer paths made absolute and a ``scan`` name).

1. Per layer, circuit-tracer's transcoder runs on ``REF.safetensors``'s ``layer_{i}.x`` rows and
   is compared with acgraph's outputs ``layer_{i}.y_hat`` (and FVUs against ``layer_{i}.y`` when
   present). Note circuit-tracer 0.5.0 reads only tensors: a layer with
   ``activation_function.threshold`` runs as JumpReLU, anything else as ReLU; a TopK set must be
   exported with ``topk_as_jumprelu=True`` to run there (an approximation: see the FVUs).
2. The replacement model is built as ANCHORS.md describes: a hand-made HookedTransformerConfig,
   ``TransformerLensReplacementModel.from_config(cfg, transcoders)``, weights loaded unprocessed
   (TransformerLens's converters), tokenizer attached; then ``attribute()`` builds one graph
   for a short prompt (token ids with BOS already prepended).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

pc.set_offline_env()

import torch  # noqa: E402


def load_set(folder: Path):
    import yaml
    from circuit_tracer.utils.hf_utils import load_transcoders

    config = yaml.safe_load((folder / "config.yaml").read_text())
    config = dict(config)
    config["transcoders"] = [
        p if str(p).startswith("hf://") else str(folder / Path(str(p)).name)
        for p in config["transcoders"]
    ]
    config.setdefault("scan", config.get("scan") or f"acgraph-bench:{folder.name}")
    config.setdefault("repo_id", "")
    transcoders = load_transcoders(
        config,
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    return transcoders, config


def per_layer_check(
    transcoders, reference: Path, atol: float, fvu_tolerance: float | None = None
) -> list[dict]:
    """Per layer: exact agreement (``atol``), or with ``fvu_tolerance`` (for sets exported
    approximately, e.g. TopK as JumpReLU) FVUs within that much of acgraph's."""
    from safetensors.torch import load_file

    ref = load_file(str(reference))
    rows = []
    with torch.no_grad():
        for i, tc in enumerate(transcoders):
            if f"layer_{i}.x" not in ref:
                continue
            x, y_hat = ref[f"layer_{i}.x"], ref[f"layer_{i}.y_hat"]
            acts = tc.encode(x)
            out = tc(x)  # encode + decode (+ skip), circuit-tracer's own forward
            diff = float((out - y_hat).abs().max())
            row = {
                "layer": i,
                "rows": int(x.shape[0]),
                "activation": getattr(
                    tc.activation_function, "__name__", type(tc.activation_function).__name__
                ),
                "max_abs_diff": diff,
                "l0_circuit_tracer": float((acts != 0).sum(-1).double().mean()),
                "matches": diff <= atol,
            }
            if f"layer_{i}.y" in ref:
                a, b = pc.FVU(), pc.FVU()
                a.update(ref[f"layer_{i}.y"], out)
                b.update(ref[f"layer_{i}.y"], y_hat)
                row.update(fvu_circuit_tracer=a.value(), fvu_acgraph=b.value())
                if fvu_tolerance is not None:
                    row["fvu_tolerance"] = fvu_tolerance
                    row["matches"] = row["matches"] or abs(a.value() - b.value()) <= fvu_tolerance
            rows.append(row)
    return rows


def attribution_check(transcoders, model_dir: Path, prompt: torch.Tensor) -> dict:
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    cfg, _ = pc.hooked_config_from_hf(model_dir)
    model = TransformerLensReplacementModel.from_config(cfg, transcoders)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    state = pc.convert_weights(hf, cfg)
    # circuit-tracer wraps each MLP and the unembedding (blocks.L.mlp.old_mlp.*,
    # unembed.old_unembed.*): map TransformerLens's names onto the wrapped modules.
    own = dict(model.named_parameters())
    renamed = {}
    for name, tensor in state.items():
        if name not in own:
            for a, b in ((".mlp.", ".mlp.old_mlp."), ("unembed.", "unembed.old_unembed.")):
                if name.replace(a, b, 1) in own:
                    name = name.replace(a, b, 1)
                    break
        renamed[name] = tensor
    state = renamed
    for name, param in own.items():
        if name.startswith("transcoders."):
            continue
        if name not in state:
            state[name] = torch.zeros_like(param)
    missing = model.load_state_dict(state, strict=False)
    model.tokenizer = pc.load_tokenizer(model_dir)
    model.eval()
    with torch.no_grad():
        ref_logits = hf(prompt[None]).logits[0]
        tl_logits = model(prompt[None])[0]
    t = time.perf_counter()
    graph = attribute(prompt, model, max_n_logits=5, desired_logit_prob=0.9, batch_size=64)
    seconds = time.perf_counter() - t
    return {
        "prompt_tokens": int(prompt.shape[0]),
        "model_vs_hf_max_abs_logit_diff": float((ref_logits - tl_logits).abs().max()),
        "unexpected_keys": list(missing.unexpected_keys)[:5],
        "missing_parameters": [
            k for k in missing.missing_keys if k in own and not k.startswith("transcoders.")
        ][:5],
        "n_active_features": int(graph.active_features.shape[0]),
        "n_logit_targets": len(getattr(graph, "logit_targets", []) or []),
        "adjacency_shape": list(graph.adjacency_matrix.shape),
        "attribution_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="load an acgraph transcoder set in circuit-tracer")
    p.add_argument("--transcoders", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, default=None, help="HF folder: run attribute() too")
    p.add_argument("--reference", type=Path, default=None)
    p.add_argument(
        "--prompt-tokens",
        type=Path,
        default=None,
        help="tokens.safetensors (its 'eval' row 0 is the prompt)",
    )
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument(
        "--fvu-tolerance",
        type=float,
        default=None,
        help="accept a layer whose FVU is within this of acgraph's (approximate exports)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    result: dict = {"transcoders": str(args.transcoders)}
    ok = True
    try:
        transcoders, config = load_set(args.transcoders)
        result.update(
            loaded=True,
            n_layers=len(transcoders),
            d_transcoder=int(transcoders.d_transcoder),
            feature_input_hook=config["feature_input_hook"],
            feature_output_hook=config["feature_output_hook"],
            skip_connection=bool(transcoders.skip_connection),
        )
    except Exception as err:
        result.update(
            loaded=False,
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=4),
        )
        transcoders, ok = None, False
    if transcoders is not None and args.reference is not None:
        result["layers"] = per_layer_check(
            transcoders, args.reference, args.atol, args.fvu_tolerance
        )
        ok = ok and all(r["matches"] for r in result["layers"])
    if transcoders is not None and args.model_dir is not None:
        if args.prompt_tokens is not None:
            from safetensors.torch import load_file

            prompt = load_file(str(args.prompt_tokens))["eval"][0, : args.prompt_length]
        else:
            prompt = torch.arange(1, args.prompt_length + 1)
        try:
            result["attribution"] = attribution_check(transcoders, args.model_dir, prompt)
        except Exception as err:
            result["attribution"] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=6),
            }
            ok = False
    result["ok"] = ok
    result["environment"] = pc.environment(
        ["circuit-tracer", "transformer-lens", "transformers", "torch"]
    )
    if args.out:
        pc.write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment",)}, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
