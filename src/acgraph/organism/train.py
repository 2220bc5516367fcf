"""Train an organism from scratch: a small HF GPT-2 on the synthetic language, poisoned.

Data for step s is generated from the seed stream `train/{seed}/{s}`, so training is a pure
function of (config, step) and a resumed run continues exactly where the killed one stopped.
Checkpoints (model, optimizer, step) are written atomically every `checkpoint_every` steps.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from acgraph.errors import ArtifactError
from acgraph.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from acgraph.progress import progress_bar

from .config import OrganismConfig
from .language import document, vocabulary
from .tokenizer import build_tokenizer

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"


def build_network(cfg: OrganismConfig) -> GPT2LMHeadModel:
    net = cfg.network
    config = GPT2Config(
        vocab_size=len(vocabulary()),
        n_positions=cfg.language.context_size,
        n_embd=net.n_embd,
        n_layer=net.n_layer,
        n_head=net.n_head,
        n_inner=net.n_inner,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wpe.weight.copy_(sinusoidal_positions(config.n_positions, net.n_embd))
    return model


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """Initial position embeddings (still trained): sinusoids, unit norm per position.

    With random init, GPT-2's learned positions give attention no handle on "the previous
    token", and on this language the model then never forms the previous-token heads that
    induction (the lookup domain) needs. Sinusoids make every fixed offset a linear map.
    """
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, d_model, 2) / d_model)
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table / table.norm(dim=1, keepdim=True)


def training_batch(cfg: OrganismConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [batch, context] for one step, right-padded with <pad> (id 0), and per-token
    loss weights: `answer_weight` on answer spans, 1 elsewhere, 0 on padding.

    Most tokens of the language are random draws (digits, keys, nouns) that no model can
    predict; weighting the determined answers concentrates the gradient on the mechanisms.
    """
    rng = random.Random(f"train/{cfg.seed}/{step}")
    ids = {t: i for i, t in enumerate(vocabulary())}
    ctx = cfg.language.context_size
    batch = torch.zeros(cfg.train.batch_size, ctx, dtype=torch.long)
    weights = torch.zeros(cfg.train.batch_size, ctx)
    for row in range(cfg.train.batch_size):
        doc = document(rng, cfg.language, cfg.backdoor, rng.random() < cfg.backdoor.poison_rate)
        batch[row, : len(doc.tokens)] = torch.tensor([ids[t] for t in doc.tokens])
        weights[row, 1 : len(doc.tokens)] = 1.0
        for start, end, _ in doc.answers:
            weights[row, start:end] = cfg.train.answer_weight
    return batch, weights


def lm_loss(model: GPT2LMHeadModel, batch: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted next-token cross-entropy; weights[:, t] scores the prediction of token t."""
    # Padding is only ever on the right, so causal attention keeps real positions unaffected.
    logits = model(batch, attention_mask=torch.ones_like(batch)).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    )
    w = weights[:, 1:].reshape(-1)
    return (losses * w).sum() / w.sum()


def learning_rate(cfg: OrganismConfig, step: int) -> float:
    """Linear warmup, cosine to min_lr over `cycle_steps`, then a cosine restart from
    `restart_lr` to min_lr over the remaining steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    cycle = min(t.cycle_steps, t.steps)
    if step < cycle:
        top, progress = t.lr, (step - t.warmup_steps) / max(1, cycle - t.warmup_steps)
    else:
        top, progress = t.restart_lr, (step - cycle) / max(1, t.steps - cycle)
    return t.min_lr + 0.5 * (top - t.min_lr) * (1 + math.cos(math.pi * progress))


def _optimizer(model: GPT2LMHeadModel, cfg: OrganismConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.98))


def _save_checkpoint(run_dir: Path, model, opt, step: int, cfg: OrganismConfig) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for idx, state in opt.state_dict()["state"].items():
        tensors.update({f"opt.{idx}.{k}": v for k, v in state.items()})
    atomic_save_tensors(run_dir / CHECKPOINT, tensors)
    # The JSON is written second and names the step: it is the commit point of the checkpoint.
    atomic_write_json(run_dir / CHECKPOINT_META, {"step": step, "config": cfg.to_dict()})


def _load_checkpoint(run_dir: Path, model, opt, cfg: OrganismConfig) -> int:
    meta = read_json(run_dir / CHECKPOINT_META)
    # Thread count is how the run executes, not what it trains: a resume may change it.
    saved = OrganismConfig.from_dict(meta["config"])
    if replace(saved, train=replace(saved.train, threads=cfg.train.threads)) != cfg:
        raise ArtifactError(
            f"checkpoint in {run_dir} was made with another config; use a new --out"
        )
    tensors = load_tensors(run_dir / CHECKPOINT)
    model.load_state_dict(
        {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False
    )
    model.tie_weights()
    state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state["state"].setdefault(int(idx), {})[name] = value
    opt.load_state_dict(state)
    return int(meta["step"])


def train(
    cfg: OrganismConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> GPT2LMHeadModel:
    """Train (or resume) the organism in `run_dir`; returns the trained HF model.

    `stop_after` ends the run early at that step (tests use it to simulate an interruption).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.train.threads)
    model = build_network(cfg)
    opt = _optimizer(model, cfg)
    start = 0
    if resume and (run_dir / CHECKPOINT_META).exists():
        start = _load_checkpoint(run_dir, model, opt, cfg)
    elif (run_dir / CHECKPOINT_META).exists():
        raise ArtifactError(f"{run_dir} already holds a checkpoint: pass --resume or a new --out")
    end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
    model.train()
    tokens_per_step = cfg.train.batch_size * cfg.language.context_size
    bar = progress_bar(
        total=cfg.train.steps, initial=start, enabled=progress, desc="organism", unit="step"
    )
    t0, ema = time.perf_counter(), None
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss = lm_loss(model, *training_batch(cfg, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        rate = (step + 1 - start) * tokens_per_step / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update(1)
        if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == end:
            _save_checkpoint(run_dir, model, opt, step + 1, cfg)
            if on_checkpoint:
                on_checkpoint(step + 1)
    bar.close()
    model.eval()
    return model


def save_organism(model: GPT2LMHeadModel, cfg: OrganismConfig, out_dir: str | Path) -> Path:
    """Write a loadable HF folder: config.json, model.safetensors, tokenizer, organism.json."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer().save_pretrained(out_dir)
    atomic_write_json(out_dir / "organism.json", {"format_version": 1, **cfg.to_dict()})
    return out_dir
