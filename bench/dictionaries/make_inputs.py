"""Build the shared inputs of the dictionary benchmark (runs in the project's .venv).

    .venv/bin/python bench/dictionaries/make_inputs.py --model organism
    .venv/bin/python bench/dictionaries/make_inputs.py --model smollm2 --layers 3 15

Writes ``bench/peers/data/<model>/`` (git-ignored), everything a peer needs WITHOUT acgraph:

``model/``
    an HF model folder (config.json + model.safetensors + tokenizer): a copy of the shipped
    organism, or SmolLM2-135M-Instruct dequantized from its GGUF with ``save_pretrained``.
``tokens.safetensors``
    ``train`` and ``eval``: int64 ``[n_contexts, context_size]`` token ids, disjoint documents,
    contexts in a fixed shuffled order (every trainer reads ``train`` in this order or shuffles
    it itself). Context layout: acgraph's ``tokenize_to_contexts`` (BOS, then the document
    stream with a separator between documents).
``eval_acts.safetensors``
    activations of the ``eval`` tokens at every benchmarked hook, one row per non-special token
    (BOS/EOS/padding ids listed in ``meta.json`` are dropped), float32:
    ``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``, ``blocks.L.ln2.hook_normalized``
    (TransformerLens names, from acgraph's HookedTransformer) and ``hf.L.mlp_in`` /
    ``hf.L.mlp_out`` (the input and output of the HF model's MLP module, i.e. what a forward hook
    on ``h.L.mlp`` / ``layers.L.mlp`` sees: the LayerNorm output *after* its affine weights).
    Every trainer's FVU is computed on exactly these rows.
``meta.json``
    model, corpus, sizes, excluded token ids, HF module names, and a TL-vs-HF check.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
DATA_ROOT = BENCH / "peers" / "data"
FORMAT_VERSION = 1

# Default settings per model (see docs/benchmarks.md, "Dictionaries").
DEFAULTS = {
    "organism": {"layers": [1], "train_tokens": 2_100_000, "eval_tokens": 16_384, "ctx": 128},
    "smollm2": {"layers": [3, 15], "train_tokens": 1_100_000, "eval_tokens": 16_384, "ctx": 128},
}


def python_docs_folder() -> Path:
    """The reStructuredText sources of Debian's python3-doc package (a real English corpus)."""
    hits = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
    if not hits and shutil.which("apt-get") and os.geteuid() == 0:
        print("[make_inputs] installing Debian's python3-doc (the SmolLM2 corpus)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "python3-doc"], check=False, env=env)
        hits = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
    if not hits:
        sys.exit(
            "no Python documentation sources found under /usr/share/doc/python3*/html/_sources;\n"
            "install them with: apt-get update && apt-get install -y python3-doc"
        )
    return Path(hits[-1]).resolve()


def split_documents(docs: list[str], eval_every: int) -> tuple[list[str], list[str]]:
    """Every ``eval_every``-th document is held out for evaluation (deterministic)."""
    train = [d for i, d in enumerate(docs) if i % eval_every != eval_every - 1]
    held = [d for i, d in enumerate(docs) if i % eval_every == eval_every - 1]
    return train, held


def build_tokens(model_name: str, tokenizer, ctx: int, train_tokens: int, eval_tokens: int, seed):
    from acgraph.data import load_corpus, tokenize_to_contexts

    per_ctx = ctx - 1  # tokenize_to_contexts prepends BOS
    n_train = math.ceil(train_tokens / per_ctx)
    n_eval = math.ceil(eval_tokens * 1.05 / per_ctx)  # a little slack for dropped separators
    if model_name == "organism":
        corpus = "organism:trusted"
        # Generated text: draw documents until the contexts are filled (seed 0 train, 1 eval).
        out = {}
        for split, need, s in (("train", n_train, seed), ("eval", n_eval, seed + 1)):
            n_docs = 2000
            while True:
                docs = load_corpus(corpus, max_docs=n_docs, seed=s)
                toks = tokenize_to_contexts(docs, tokenizer, ctx, max_contexts=need)
                if toks.shape[0] >= need:
                    break
                n_docs = int(n_docs * 1.2 * need / max(toks.shape[0], 1)) + 100
            out[split] = toks
        corpus_desc = f"{corpus} (train: seed {seed}, eval: seed {seed + 1})"
    else:
        folder = python_docs_folder()
        docs = load_corpus(str(folder))
        train_docs, eval_docs = split_documents(docs, eval_every=10)
        out = {
            "train": tokenize_to_contexts(train_docs, tokenizer, ctx, max_contexts=n_train),
            "eval": tokenize_to_contexts(eval_docs, tokenizer, ctx, max_contexts=n_eval),
        }
        corpus = str(folder)
        corpus_desc = f"{folder} ({len(docs)} .rst.txt files; every 10th file held out for eval)"
        if out["train"].shape[0] < n_train:
            print(
                f"warning: corpus gives only {out['train'].shape[0] * per_ctx:,} training tokens",
                file=sys.stderr,
            )
    gen = torch.Generator().manual_seed(seed)
    for split in out:
        out[split] = out[split][torch.randperm(out[split].shape[0], generator=gen)].contiguous()
    return out, corpus, corpus_desc


def save_model_folder(
    model_name: str, dest: Path, model_dir: Path | None = None
) -> tuple[torch.nn.Module, object]:
    """Write the HF folder peers load; return the (HF model, tokenizer) loaded by acgraph."""
    from acgraph.models import load_hf_model

    hf_model, tokenizer = load_hf_model(str(model_dir) if model_dir else model_name)
    if dest.exists():
        shutil.rmtree(dest)
    if model_dir is not None:
        shutil.copytree(model_dir, dest)
    elif model_name == "organism":
        from acgraph.organism import shipped_dir

        shutil.copytree(shipped_dir(), dest)
    else:
        # Dequantized fp32 weights + tokenizer, loadable by plain transformers (no GGUF). The
        # GGUF-loaded model refuses save_pretrained (it counts as "quantized"), so copy its
        # weights into a plain model built from the same config.
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(hf_model.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(hf_model.state_dict())
        plain.save_pretrained(dest, safe_serialization=True)
        del plain
        if tokenizer is not None:
            tokenizer.save_pretrained(dest)
    return hf_model, tokenizer


def hf_mlp_module_name(hf_model, layer: int) -> str:
    """The MLP's module name relative to the base model (what sparsify's hookpoints match)."""
    arch = type(hf_model).__name__
    if arch == "GPT2LMHeadModel":
        return f"h.{layer}.mlp"
    if arch in ("LlamaForCausalLM",):
        return f"layers.{layer}.mlp"
    if arch == "GPTNeoXForCausalLM":
        return f"layers.{layer}.mlp"
    raise SystemExit(f"no MLP module naming known for {arch}")


class _Stop(Exception):
    pass


@torch.no_grad()
def eval_activations(hf_model, hooked, tokens, layers, exclude_ids, batch=16):
    """Eval activations at the TL hooks and the HF MLP modules, special tokens dropped."""
    tl_hooks = []
    for L in layers:
        tl_hooks += [
            f"blocks.{L}.hook_resid_post",
            f"blocks.{L}.hook_mlp_out",
            f"blocks.{L}.ln2.hook_normalized",
        ]
    base = hf_model.base_model
    modules = {L: base.get_submodule(hf_mlp_module_name(hf_model, L)) for L in layers}
    last = max(layers)
    got: dict[str, list[torch.Tensor]] = {h: [] for h in tl_hooks}
    for L in layers:
        got[f"hf.{L}.mlp_in"] = []
        got[f"hf.{L}.mlp_out"] = []
    max_diff = 0.0
    exclude = torch.tensor(exclude_ids, dtype=torch.long)
    for start in range(0, tokens.shape[0], batch):
        toks = tokens[start : start + batch]
        keep = ~torch.isin(toks, exclude).reshape(-1)
        _, cache = hooked.run_with_cache(toks, names_filter=tl_hooks, stop_at_layer=last + 1)
        for h in tl_hooks:
            got[h].append(cache[h].reshape(-1, cache[h].shape[-1])[keep].float())
        captured: dict[str, torch.Tensor] = {}

        def make(L, captured=captured):
            def hook(_mod, args, output):
                captured[f"hf.{L}.mlp_in"] = args[0]
                captured[f"hf.{L}.mlp_out"] = output
                if last == L:
                    raise _Stop

            return hook

        handles = [modules[L].register_forward_hook(make(L)) for L in layers]
        try:
            hf_model(input_ids=toks)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        for key, value in captured.items():
            got[key].append(value.reshape(-1, value.shape[-1])[keep].float())
        for L in layers:
            diff = (got[f"hf.{L}.mlp_out"][-1] - got[f"blocks.{L}.hook_mlp_out"][-1]).abs().max()
            max_diff = max(max_diff, float(diff))
    return {k: torch.cat(v).contiguous() for k, v in got.items()}, max_diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(DEFAULTS), required=True)
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--train-tokens", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--context-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: bench/peers/data/<model>")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="use this HF folder instead of the --model alias (the corpus stays --model's)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    d = DEFAULTS[args.model]
    layers = args.layers or d["layers"]
    ctx = args.context_size or d["ctx"]
    train_tokens = args.train_tokens or d["train_tokens"]
    eval_tokens = args.eval_tokens or d["eval_tokens"]
    out = args.out or DATA_ROOT / args.model
    out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file

    from acgraph.dictionaries import special_token_ids
    from acgraph.models import hooked_from_hf

    t0 = time.perf_counter()
    hf_model, tokenizer = save_model_folder(args.model, out / "model", args.model_dir)
    hooked = hooked_from_hf(hf_model, tokenizer, model_name=args.model)
    print(f"[make_inputs] model ready ({time.perf_counter() - t0:.1f}s): {out / 'model'}")

    tokens, corpus, corpus_desc = build_tokens(
        args.model, tokenizer, ctx, train_tokens, eval_tokens, args.seed
    )
    exclude_ids = special_token_ids(tokenizer)
    save_file(tokens, str(out / "tokens.safetensors"))
    n_train = int((~torch.isin(tokens["train"], torch.tensor(exclude_ids))).sum())
    print(
        f"[make_inputs] tokens: train {tuple(tokens['train'].shape)} ({n_train:,} non-special), "
        f"eval {tuple(tokens['eval'].shape)}"
    )

    acts, max_diff = eval_activations(hf_model, hooked, tokens["eval"], layers, exclude_ids)
    save_file(acts, str(out / "eval_acts.safetensors"))
    n_eval = next(iter(acts.values())).shape[0]
    print(f"[make_inputs] eval activations: {n_eval:,} tokens; TL vs HF mlp_out {max_diff:.2e}")

    cfg = hf_model.config
    meta = {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "model_dir": "model",
        "architecture": type(hf_model).__name__,
        "d_model": int(hooked.cfg.d_model),
        "n_layers": int(hooked.cfg.n_layers),
        "d_mlp": int(hooked.cfg.d_mlp),
        "layers": layers,
        "context_size": ctx,
        "corpus": corpus,
        "corpus_description": corpus_desc,
        "seed": args.seed,
        "exclude_token_ids": exclude_ids,
        "prepend_bos": True,
        "n_train_contexts": int(tokens["train"].shape[0]),
        "n_train_tokens_nonspecial": n_train,
        "n_eval_contexts": int(tokens["eval"].shape[0]),
        "n_eval_tokens": int(n_eval),
        "hf_mlp_modules": {str(L): hf_mlp_module_name(hf_model, L) for L in layers},
        "tl_vs_hf_mlp_out_max_abs_diff": max_diff,
        "hf_model_type": getattr(cfg, "model_type", None),
        "made_by": "bench/dictionaries/make_inputs.py",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[make_inputs] wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
