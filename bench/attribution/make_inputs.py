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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("bench/peers/data/attribution"))
    args = p.parse_args()
    out = args.out
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
