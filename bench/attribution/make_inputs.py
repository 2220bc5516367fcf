"""Inputs shared by both tools (runs in acgraph's venv).

    .venv/bin/python bench/attribution/make_inputs.py [--out bench/peers/data/attribution]

Writes under ``--out``:
- ``transcoders/``: the organism's shipped skip transcoders as a circuit-tracer transcoder set.
  circuit-tracer 0.5.0 runs only JumpReLU (threshold tensor present) or ReLU, so the TopK set is
  written as JumpReLU with its calibrated per-latent thresholds (``topk_as_jumprelu=True``);
  BOTH tools then load this same folder, so features, activations and node sets are identical.
- ``organism/``: the shipped organism (HF folder, context 128).
- ``organism_ctx256/``: the same weights with the learned position table tiled to 256 rows
  (positions 128..255 reuse rows 0..127). The organism was trained on 128-token contexts, so its
  outputs past 128 are not meaningful; this model exists only to time 256-token graphs.
- ``prompts.json``: token ids (BOS first) of lengths 16, 64, 128, 256 cut from organism text.

``--model smollm2`` (into ``--out bench/peers/data/attribution_smollm2``): SmolLM2-135M-Instruct
from the dictionaries benchmark's inputs (``bench/peers/data/smollm2``, made by
``bench/dictionaries/run.py --model smollm2``), linked as ``smollm2/``; TopK transcoders for all
30 layers trained briefly by acgraph on its Python-docs training contexts (their quality does not
matter here), written as a JumpReLU circuit-tracer set with their calibrated thresholds; and
prompts of 16, 64 and 256 tokens from the held-out contexts.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from acgraph.attribution import load_transcoders
from acgraph.dictionaries.formats import export_circuit_tracer
from acgraph.organism import generate_texts, shipped_dir
from acgraph.organism.evaluate import encode

LENGTHS = (16, 64, 128, 256)


SMOLLM2 = Path("bench/peers/data/smollm2")


def smollm2_inputs(out: Path, width: int, k: int, tokens: int) -> None:
    from safetensors.torch import load_file as load

    from acgraph.dictionaries import DictionaryConfig, TrainConfig, train_dictionaries
    from acgraph.models import load_model

    model_dir = (SMOLLM2 / "model").resolve()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} missing: run bench/dictionaries/run.py --model smollm2")
    link = out / "smollm2"
    if not link.exists():
        link.symlink_to(model_dir)
    model = load_model(str(model_dir))
    contexts = load(str(SMOLLM2 / "tokens.safetensors"))
    meta = json.loads((SMOLLM2 / "meta.json").read_text())
    configs = [
        DictionaryConfig(
            kind="transcoder",
            d_in=model.cfg.d_model,
            d_sae=width,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hooks_out=[f"blocks.{layer}.hook_mlp_out"],
            activation="topk",
            k=k,
            model_name="smollm2",
        )
        for layer in range(model.cfg.n_layers)
    ]
    run = train_dictionaries(
        model,
        contexts["train"],
        configs,
        None,
        TrainConfig(total_tokens=tokens, model_autocast="bfloat16", checkpoint_every=0),
        exclude_token_ids=meta["exclude_token_ids"],
        save_final=False,
    )
    export_circuit_tracer(
        run.dictionaries, out / "transcoders", topk_as_jumprelu=True, scan="acgraph-smollm2"
    )
    evals = contexts["eval"]
    long = torch.cat([evals[0], evals[1][1:], evals[2][1:]])  # BOS once
    prompts = {str(n): long[:n].tolist() for n in (16, 64, 256)}
    (out / "prompts.json").write_text(json.dumps(prompts))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--model", choices=("organism", "smollm2"), default="organism")
    p.add_argument("--width", type=int, default=1152, help="smollm2 transcoders")
    p.add_argument("--k", type=int, default=8, help="smollm2 transcoders")
    p.add_argument("--tokens", type=int, default=65_536, help="smollm2 training tokens")
    args = p.parse_args()
    out = args.out or Path(
        "bench/peers/data/attribution" + ("" if args.model == "organism" else "_smollm2")
    )
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        smollm2_inputs(out, args.width, args.k, args.tokens)
        return
    out.mkdir(parents=True, exist_ok=True)
    ts = load_transcoders("organism")
    export_circuit_tracer(
        ts.dictionaries, out / "transcoders", topk_as_jumprelu=True, scan="acgraph-organism"
    )
    src = shipped_dir()
    for name in ("organism", "organism_ctx256"):
        dst = out / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("transcoders"))
    cfg_path = out / "organism_ctx256" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_positions"] = 256
    cfg_path.write_text(json.dumps(cfg, indent=2))
    weights = load_file(str(out / "organism_ctx256" / "model.safetensors"))
    key = next(k for k in weights if k.endswith("wpe.weight"))
    weights[key] = torch.cat([weights[key], weights[key]]).contiguous()
    save_file(weights, str(out / "organism_ctx256" / "model.safetensors"), {"format": "pt"})
    words: list[str] = []
    for text in generate_texts(64, seed=11, split="trusted"):
        words += text.split()
    prompts = {}
    for n in LENGTHS:
        ids = encode([["<bos>", *words[: n - 1]]])[0]
        prompts[str(n)] = ids.tolist()
    (out / "prompts.json").write_text(json.dumps(prompts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
