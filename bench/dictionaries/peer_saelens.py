"""Train a TopK SAE with SAELens on the shared benchmark inputs (runs in bench/peers/saelens).

    bench/peers/saelens/bin/python bench/dictionaries/peer_saelens.py \
        --data bench/peers/data/organism --hook blocks.1.hook_resid_post \
        --width 2048 --k 16 --batch 4096 --tokens 2000000 --lr 5.66e-4 --out result.json

SAELens is used the way its docs say for a model you built yourself:
``LanguageModelSAETrainingRunner(cfg, override_model=..., override_dataset=...)`` with a
``LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(...))`` and a pre-tokenized dataset
(``input_ids`` of exactly ``context_size``). The model is an unprocessed HookedTransformer built
by hand from the HF folder (peer_common.hooked_transformer_from_hf). SAE-side settings are
SAELens's defaults for TopK (AuxK coefficient 1, decoder-norm rescaling, b_dec applied to the
input, decoder init norm 0.1, no activation normalization); shared settings (width, k, batch,
token budget, lr, warmup/decay, shuffle-buffer size, excluded special tokens) come from the
command line so every trainer gets the same ones.

Measured: tokens/s of ``SAETrainer.fit()`` alone (activation generation + SAE steps; model
building, dataset setup and saving excluded), peak RSS of the process, and FVU / L0 / dead
fraction computed here, in float64, from the saved ``sae_weights.safetensors`` on the fixed
held-out activations in ``eval_acts.safetensors`` (not SAELens's own metrics). The saved folder
is also reloaded with ``SAE.load_from_disk`` to check SAELens's own forward agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

pc.set_offline_env()

import torch  # noqa: E402


def topk_forward(weights: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A SAELens TopK SAE's forward, written from its saved weights and cfg.json."""
    W_enc, b_enc, W_dec, b_dec = (weights[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SystemExit(f"unsupported normalize_activations {cfg['normalize_activations']!r}")
    xin = x - b_dec if cfg.get("apply_b_dec_to_input", True) else x
    pre = xin @ W_enc + b_enc
    norms = W_dec.norm(dim=-1)
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescale:
        pre = pre * norms
    values, indices = pre.topk(int(cfg["k"]), dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    dec_in = acts / norms if rescale else acts
    return dec_in @ W_dec + b_dec, acts


@torch.no_grad()
def evaluate(folder: Path, x_all: torch.Tensor, chunk: int = 4096) -> dict:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(str(folder / "sae_weights.safetensors"))
    fvu = pc.FVU()
    l0_sum, n, fired = 0.0, 0, None
    for start in range(0, x_all.shape[0], chunk):
        x = x_all[start : start + chunk]
        out, acts = topk_forward(weights, cfg, x)
        fvu.update(x, out)
        l0, fired = pc.sparsity_stats(acts, fired)
        l0_sum += l0 * x.shape[0]
        n += x.shape[0]
    # SAELens's own inference path on the same folder: load_from_disk + forward.
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder), device="cpu")
    sae.eval()
    probe = x_all[:2048]
    ours, _ = topk_forward(weights, cfg, probe)
    reload_diff = float((sae(probe) - ours).abs().max())
    return {
        "fvu": fvu.value(),
        "l0": l0_sum / n,
        "dead_fraction_eval": float(1.0 - fired.float().mean()),
        "eval_tokens": n,
        "saelens_reload_max_abs_diff": reload_diff,
        "saved_cfg": {k: cfg.get(k) for k in ("architecture", "d_in", "d_sae", "k")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SAELens TopK SAE on the shared benchmark inputs")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--hook", required=True, help="TransformerLens hook name")
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch", type=int, default=4096, help="training batch, tokens")
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--buffer-tokens", type=int, default=65_536)
    p.add_argument("--model-batch", type=int, default=32, help="contexts per model forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="autocast_lm: model forward in bf16")
    p.add_argument("--bf16-weights", action="store_true", help="the model's weights in bf16")
    p.add_argument("--save-dir", type=Path, default=None, help="keep the trained SAE here")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    inputs = pc.load_inputs(args.data)
    meta = inputs["meta"]
    probe_x = pc.eval_acts(args.data, args.hook, rows=4 * meta["context_size"])
    d_in = int(probe_x.shape[-1])

    import datasets
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )

    t0 = time.perf_counter()
    model = pc.hooked_transformer_from_hf(
        inputs["model_dir"], torch.bfloat16 if args.bf16_weights else torch.float32
    )
    load_s = time.perf_counter() - t0
    # The hand-built model must give the activations acgraph recorded.
    with torch.no_grad():
        toks = inputs["tokens"]["eval"][:4]
        keep = ~torch.isin(toks, torch.tensor(meta["exclude_token_ids"])).reshape(-1)
        layer = int(args.hook.split(".")[1])
        _, cache = model.run_with_cache(toks, names_filter=[args.hook], stop_at_layer=layer + 1)
        got = cache[args.hook].reshape(-1, d_in)[keep]
        model_diff = float((got - probe_x[: got.shape[0]]).abs().max())

    train_tokens = inputs["tokens"]["train"]
    ctx = int(train_tokens.shape[1])
    dataset = datasets.Dataset.from_dict({"input_ids": train_tokens.numpy()})
    steps = args.tokens // args.batch
    warmup = min(args.warmup_steps, max(steps // 10, 1))
    decay = int(steps * args.decay_fraction)
    tmp = tempfile.TemporaryDirectory(prefix="peer_saelens_")
    out_dir = args.save_dir or Path(tmp.name) / "sae"

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=args.width,
            k=args.k,
            dtype="float32",
            device="cpu",
        ),
        model_name=meta["model"],
        hook_name=args.hook,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=ctx,
        prepend_bos=bool(meta.get("prepend_bos", True)),
        exclude_special_tokens=list(meta["exclude_token_ids"]),
        training_tokens=steps * args.batch,
        train_batch_size_tokens=args.batch,
        store_batch_size_prompts=args.model_batch,
        # SAELens's mixing buffer holds n_batches_in_buffer * context_size tokens.
        n_batches_in_buffer=max(1, args.buffer_tokens // ctx),
        lr=args.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warmup,
        lr_decay_steps=decay,
        device="cpu",
        seed=args.seed,
        dtype="float32",
        autocast_lm=args.bf16,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(out_dir),
        verbose=False,
    )

    timing: dict[str, float] = {}

    class TimedRunner(LanguageModelSAETrainingRunner):
        def run_trainer_with_interruption_handling(self, trainer):
            t = time.perf_counter()
            sae = super().run_trainer_with_interruption_handling(trainer)
            timing["fit_s"] = time.perf_counter() - t
            timing["samples"] = float(trainer.n_training_samples)
            timing["steps"] = float(trainer.n_training_steps)
            timing["dead_at_end"] = float(trainer.dead_neurons.float().mean())
            return sae

    runner = TimedRunner(cfg, override_model=model, override_dataset=dataset)
    runner.run()
    rss_train = pc.peak_rss_mb()  # before the eval activations are loaded
    metrics = evaluate(out_dir, pc.eval_acts(args.data, args.hook))

    result = {
        "peer": "saelens",
        "kind": "sae",
        "architecture": "topk",
        "model": meta["model"],
        "hook_in": args.hook,
        "hook_out": args.hook,
        "d_in": d_in,
        "width": args.width,
        "k": args.k,
        "batch_tokens": args.batch,
        "training_tokens": int(timing["samples"]),
        "steps": int(timing["steps"]),
        "lr": args.lr,
        "lr_warmup_steps": warmup,
        "lr_decay_steps": decay,
        "buffer_tokens": cfg.n_batches_in_buffer * ctx,
        "autocast_lm": args.bf16,
        "model_dtype": str(next(model.parameters()).dtype),
        "context_size": ctx,
        "train_seconds": timing["fit_s"],
        "tokens_per_second": timing["samples"] / timing["fit_s"],
        "model_load_seconds": load_s,
        "peak_rss_mb": rss_train,
        "dead_fraction_train": timing["dead_at_end"],
        **metrics,
        "model_check_max_abs_diff": model_diff,
        "wall_seconds": time.perf_counter() - t_start,
        "environment": pc.environment(["sae-lens", "transformer-lens", "transformers", "torch"]),
    }
    pc.write_json(args.out, result)
    print(
        f"[saelens] {args.hook}: {result['tokens_per_second']:,.0f} tok/s, "
        f"FVU {result['fvu']:.4f}, L0 {result['l0']:.1f}, peak RSS {rss_train:,.0f} MB"
    )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
