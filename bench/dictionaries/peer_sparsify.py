"""Train a TopK transcoder (or SAE) with EleutherAI sparsify on the shared benchmark inputs
(runs in bench/peers/sparsify).

    bench/peers/sparsify/bin/python bench/dictionaries/peer_sparsify.py \
        --data bench/peers/data/organism --layer 1 --width 2048 --k 16 --batch 4096 \
        --tokens 2000000 --lr 5.66e-4 --out result.json

sparsify is used the way its README shows for programmatic training:
``Trainer(TrainConfig(SparseCoderConfig(...), ...), tokenized_dataset, model).fit()`` with the
base HF model (``AutoModel``, as its CLI loads it for the default ``fvu`` loss) and a dataset of
``input_ids``. The hookpoint is the HF MLP module (``h.L.mlp`` for GPT-2, ``layers.L.mlp`` for
Llama); with ``transcode=True`` sparsify reads that module's input (the LayerNorm output,
after its affine weights: TransformerLens's ``blocks.L.ln2.hook_normalized`` times ``w`` plus
``b``) and predicts its output (``blocks.L.hook_mlp_out``). Shared settings (width, k, batch,
token budget, lr, warmup, excluded special tokens) come from the command line; the rest are
sparsify's defaults, except the optimizer: Adam with the shared lr by default (sparsify 1.3's
default is ScheduleFree SignSGD; ``--optimizer signum`` selects it, with its own lr rule if
``--lr 0``). sparsify has no shuffle buffer: each step's activations come from one forward over
``batch // context_size`` contexts (our token file is already shuffled by context), and it
runs the whole model (no early stop after the hooked layer).

Measured: tokens/s of ``Trainer.fit()`` alone (model loading excluded), peak RSS, and FVU / L0 /
dead fraction computed here in float64 from the saved ``sae.safetensors`` on the fixed held-out
activations (the HF MLP module's input and output rows in ``eval_acts.safetensors``). The saved
folder is also reloaded with ``SparseCoder.load_from_disk`` to check sparsify's own forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

pc.set_offline_env()
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402


def coder_forward(weights: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparsify SparseCoder's forward, written from its saved weights and cfg.json."""
    enc_w, enc_b = weights["encoder.weight"].float(), weights["encoder.bias"].float()
    W_dec, b_dec = weights["W_dec"].float(), weights["b_dec"].float()
    if cfg.get("activation", "topk") != "topk":
        raise SystemExit(f"unsupported activation {cfg.get('activation')!r}")
    xin = x if cfg.get("transcode", False) else x - b_dec
    pre = torch.relu(xin @ enc_w.T + enc_b)
    values, indices = pre.topk(int(cfg["k"]), dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter_(-1, indices, values)
    out = acts @ W_dec + b_dec
    if "W_skip" in weights:
        out = out + x @ weights["W_skip"].float().T
    return out, acts


@torch.no_grad()
def evaluate(folder: Path, x_all: torch.Tensor, y_all: torch.Tensor, chunk: int = 4096) -> dict:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(str(folder / "sae.safetensors"))
    fvu = pc.FVU()
    l0_sum, n, fired = 0.0, 0, None
    for start in range(0, x_all.shape[0], chunk):
        x, y = x_all[start : start + chunk], y_all[start : start + chunk]
        out, acts = coder_forward(weights, cfg, x)
        fvu.update(y, out)
        l0, fired = pc.sparsity_stats(acts, fired)
        l0_sum += l0 * x.shape[0]
        n += x.shape[0]
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(folder, device="cpu")
    probe = x_all[:2048]
    ours, _ = coder_forward(weights, cfg, probe)
    theirs = coder(probe, y_all[:2048]).sae_out
    return {
        "fvu": fvu.value(),
        "l0": l0_sum / n,
        "dead_fraction_eval": float(1.0 - fired.float().mean()),
        "eval_tokens": n,
        "sparsify_reload_max_abs_diff": float((theirs - ours).abs().max()),
        "saved_cfg": {
            k: cfg.get(k)
            for k in ("activation", "k", "num_latents", "transcode", "skip_connection", "d_in")
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="sparsify TopK transcoder on the shared inputs")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument(
        "--kind",
        choices=("transcoder", "sae"),
        default="transcoder",
        help="transcoder: MLP input -> MLP output; sae: MLP output",
    )
    p.add_argument("--skip", action="store_true", help="skip transcoder (W_skip)")
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch", type=int, default=4096, help="training batch, tokens (incl. BOS)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--lr", type=float, required=True, help="0: sparsify's own rule")
    p.add_argument("--optimizer", choices=("adam", "signum"), default="adam")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="fit() under bf16 autocast: sparsify's GPU default (bf16 model and coder forward)",
    )
    p.add_argument("--save-dir", type=Path, default=None, help="keep the trained coder here")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    inputs = pc.load_inputs(args.data)
    meta = inputs["meta"]
    module = meta["hf_mlp_modules"][str(args.layer)]
    key_in = f"hf.{args.layer}.mlp_in" if args.kind == "transcoder" else f"hf.{args.layer}.mlp_out"
    key_out = f"hf.{args.layer}.mlp_out"
    ctx = int(meta["context_size"])
    probe_rows = 4 * ctx
    probe_in = pc.eval_acts(args.data, key_in, rows=probe_rows)
    probe_out = pc.eval_acts(args.data, key_out, rows=probe_rows)

    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer
    from transformers import AutoModel

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(str(inputs["model_dir"]), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    exclude = torch.tensor(meta["exclude_token_ids"])
    with torch.no_grad():  # the HF model must give the activations acgraph recorded
        toks = inputs["tokens"]["eval"][:4]
        keep = ~torch.isin(toks, exclude).reshape(-1)
        seen = {}
        h = model.base_model.get_submodule(module).register_forward_hook(
            lambda _m, a, o: seen.update(i=a[0], o=o)
        )
        model(input_ids=toks)
        h.remove()
        got_in = seen["i"] if args.kind == "transcoder" else seen["o"]
        got_in = got_in.reshape(-1, probe_in.shape[-1])
        got_out = seen["o"].reshape(-1, probe_out.shape[-1])
        model_diff = max(
            float((got_in[keep] - probe_in[: int(keep.sum())]).abs().max()),
            float((got_out[keep] - probe_out[: int(keep.sum())]).abs().max()),
        )

    seqs = max(1, args.batch // ctx)
    steps = args.tokens // (seqs * ctx)
    train = inputs["tokens"]["train"][: steps * seqs]
    if train.shape[0] < steps * seqs:
        raise SystemExit(f"only {train.shape[0]} training contexts, need {steps * seqs}")
    n_train_tokens = int((~torch.isin(train, exclude)).sum())
    dataset = Dataset.from_dict({"input_ids": train.numpy()}).with_format("torch")

    tmp = tempfile.TemporaryDirectory(prefix="peer_sparsify_")
    save_root = Path(args.save_dir) if args.save_dir else Path(tmp.name)
    run_name = f"L{args.layer}"
    cfg = TrainConfig(
        SparseCoderConfig(
            activation="topk",
            num_latents=args.width,
            k=args.k,
            transcode=args.kind == "transcoder",
            skip_connection=args.skip,
        ),
        batch_size=seqs,
        loss_fn="fvu",
        optimizer=args.optimizer,
        lr=args.lr or None,
        lr_warmup_steps=min(args.warmup_steps, max(steps // 10, 1)),
        exclude_tokens=list(meta["exclude_token_ids"]),
        hookpoints=[module],
        init_seeds=[args.seed],
        save_every=10**9,
        log_to_wandb=False,
        run_name=run_name,
        save_dir=str(save_root),
    )
    trainer = Trainer(cfg, dataset, model)
    t1 = time.perf_counter()
    # On a bf16-capable GPU sparsify loads the model in bf16 and autocasts the coder's forward
    # to bf16; on the CPU its code enables neither, so --bf16 applies one CPU autocast to both.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        trainer.fit()
    fit_s = time.perf_counter() - t1
    rss_train = pc.peak_rss_mb()  # before the eval activations are loaded
    dead_train = float(
        (trainer.num_tokens_since_fired[module] > cfg.dead_feature_threshold).float().mean()
    )
    folder = save_root / run_name / module
    metrics = evaluate(folder, pc.eval_acts(args.data, key_in), pc.eval_acts(args.data, key_out))

    result = {
        "peer": "sparsify",
        "bf16_autocast": args.bf16,
        "kind": ("skip_transcoder" if args.skip else "transcoder")
        if args.kind == "transcoder"
        else "sae",
        "architecture": "topk",
        "model": meta["model"],
        "hookpoint": module,
        "hook_in": f"{module} input" if args.kind == "transcoder" else f"{module} output",
        "hook_out": f"{module} output",
        "d_in": int(probe_in.shape[-1]),
        "width": args.width,
        "k": args.k,
        "batch_tokens": seqs * ctx,
        "batch_contexts": seqs,
        "training_tokens": n_train_tokens,
        "steps": steps,
        "optimizer": args.optimizer,
        "lr": trainer.optimizers[0].param_groups[0].get("initial_lr", args.lr)
        if args.optimizer == "adam"
        else (args.lr or None),
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "buffer_tokens": seqs * ctx,
        "context_size": ctx,
        "train_seconds": fit_s,
        "tokens_per_second": n_train_tokens / fit_s,
        "model_load_seconds": load_s,
        "peak_rss_mb": rss_train,
        "dead_fraction_train": dead_train,
        **metrics,
        "model_check_max_abs_diff": model_diff,
        "wall_seconds": time.perf_counter() - t_start,
        "environment": pc.environment(["eai-sparsify", "transformers", "torch"]),
    }
    pc.write_json(args.out, result)
    print(
        f"[sparsify] {module} ({result['kind']}): {result['tokens_per_second']:,.0f} tok/s, "
        f"FVU {result['fvu']:.4f}, L0 {result['l0']:.1f}, peak RSS {rss_train:,.0f} MB"
    )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
