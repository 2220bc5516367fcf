"""Dictionary benchmark: acgraph vs SAELens (TopK SAE) and EleutherAI sparsify (TopK
transcoder), same machine, model, hook, width, k, batch, token budget, lr, and data.

Run from the repository root with the project's venv:

    .venv/bin/python bench/dictionaries/run.py --model organism              # layer 1
    .venv/bin/python bench/dictionaries/run.py --model smollm2 --layer 3
    .venv/bin/python bench/dictionaries/run.py --model smollm2 --layer 15
    .venv/bin/python bench/dictionaries/run.py --model organism --only saelens sparsify
    .venv/bin/python bench/dictionaries/run.py interop --model organism      # format checks

Each run is a fresh subprocess (so peak RSS is per trainer), pinned to ``--threads`` torch
threads (2), in its own venv: SAELens in bench/peers/saelens, sparsify in bench/peers/sparsify,
ours in .venv. Missing pieces are made first: the peers' venvs (``bench/setup_peers.sh``) and
the shared inputs (``make_inputs.py`` -> bench/peers/data/<model>/). Per-run JSON and logs go
to bench/peers/runs/<model>_L<layer>/ (git-ignored); the summary, with ratios, to
``bench/results/dictionaries_<model>_layer<L>.json`` (runs not repeated this time are kept from
the previous summary).

Pairs compared:
- ``sae``: SAELens TopK SAE vs ours (kind ``sae``, activation ``topk``) on
  ``blocks.L.hook_resid_post`` (``--sae-hook`` picks another TransformerLens hook);
- ``transcoder``: sparsify TopK transcoder on the HF MLP module (input after ln_2 -> output) vs
  ours (kind ``transcoder``, ``blocks.L.ln2.hook_normalized`` -> ``blocks.L.hook_mlp_out``; our
  input is before the LayerNorm's affine weights, sparsify's after: the same information, an
  affine map apart; both predict the same MLP output).

Metrics (every trainer, computed the same way by bench code, not by the trainer): training
tokens/s over the training loop only (model loading and evaluation excluded; activation
generation included, as every trainer computes activations on the fly), peak RSS of the
process (ru_maxrss, measured before evaluation), FVU (float64, global mean, ANCHORS.md) and L0
on the held-out activations in eval_acts.safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
OUR_PY = ROOT / ".venv" / "bin" / "python"
PEER_PY = {
    "saelens": PEERS / "saelens" / "bin" / "python",
    "sparsify": PEERS / "sparsify" / "bin" / "python",
    "circuit_tracer": PEERS / "circuit_tracer" / "bin" / "python",
}
RUN_ORDER = ("saelens", "ours_sae", "sparsify", "ours_transcoder")

# The benchmark settings (docs/benchmarks.md). lr None: 2e-4 / sqrt(width / 16384), the rule
# sparsify and acgraph both default to, passed explicitly to every trainer.
SETTINGS: dict[str, dict[str, Any]] = {
    "organism": {"layers": [1], "width": 2048, "k": 16, "batch": 4096, "tokens": 2_000_000},
    "smollm2": {"layers": [3, 15], "width": 4608, "k": 32, "batch": 4096, "tokens": 1_000_000},
}


def default_lr(width: int) -> float:
    return 2e-4 / math.sqrt(width / 16384)


# ====================================================================== OUR TRAINER PLUGS IN HERE


def train_ours(
    *,
    data_dir: Path,
    kind: str,
    hook_in: str,
    hook_out: str,
    width: int,
    k: int,
    batch: int,
    tokens: int,
    lr: float,
    warmup_steps: int,
    decay_fraction: float,
    buffer_tokens: int,
    model_batch: int,
    seed: int,
    save_dir: Path | None,
    bf16: bool = False,
    bf16_weights: bool = False,
    forward: str = "lean",
) -> dict[str, Any]:
    """Train ONE acgraph dictionary on the shared inputs and return the benchmark record.

    This is where acgraph's trainer (``acgraph.dictionaries.train_dictionaries``) plugs into
    the benchmark. Runs in the project's .venv, in its own process (see ``_worker``); the
    caller has set the torch thread count. Same contract as the peer scripts: time the
    training loop only, measure peak RSS before evaluation, compute FVU/L0 with
    peer_common (identical code for every trainer) on the held-out activations.
    """
    import torch

    sys.path.insert(0, str(HERE))
    import peer_common as pc

    from acgraph.dictionaries import (
        DictionaryConfig,
        TrainConfig,
        fvu,
        save_dictionary,
        train_dictionaries,
    )
    from acgraph.models import load_model

    inputs = pc.load_inputs(data_dir)
    meta = inputs["meta"]
    t0 = time.perf_counter()
    model = load_model(
        str(inputs["model_dir"]), dtype=torch.bfloat16 if bf16_weights else torch.float32
    )
    load_s = time.perf_counter() - t0
    d_in = int(model.cfg.d_model)
    cfg = DictionaryConfig(
        kind=kind,
        d_in=d_in,
        d_sae=width,
        hook_in=hook_in,
        hooks_out=[hook_out],
        activation="topk",
        k=k,
        model_name=meta["model"],
    )
    tcfg = TrainConfig(
        total_tokens=tokens,
        batch_size=batch,
        lr=lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_fraction=decay_fraction,
        buffer_tokens=buffer_tokens,
        model_batch_size=model_batch,
        checkpoint_every=0,
        seed=seed,
        progress=True,
        model_autocast="bfloat16" if bf16 else None,
        model_forward=forward,
    )
    t1 = time.perf_counter()
    result = train_dictionaries(
        model,
        inputs["tokens"]["train"],
        [cfg],
        None,  # no checkpoints or files during the timed run
        tcfg,
        exclude_token_ids=list(meta["exclude_token_ids"]),
    )
    train_s = time.perf_counter() - t1
    rss = pc.peak_rss_mb()  # before the eval activations are loaded
    dictionary = result.dictionaries[0].eval()
    if save_dir is not None:
        save_dictionary(dictionary, save_dir)

    x_all, y_all = pc.eval_acts(data_dir, hook_in), pc.eval_acts(data_dir, hook_out)
    acc = pc.FVU()
    l0_sum, n, fired = 0.0, 0, None
    with torch.no_grad():
        for start in range(0, x_all.shape[0], 4096):
            x, y = x_all[start : start + 4096], y_all[start : start + 4096]
            out, acts, _ = dictionary.forward_with_acts(x)
            acc.update(y, out)
            l0, fired = pc.sparsity_stats(acts, fired)
            l0_sum += l0 * x.shape[0]
            n += x.shape[0]
        library_fvu = fvu(y_all, dictionary(x_all))  # acgraph's own metric, as a cross-check
    last = result.final_metrics()
    return {
        "peer": "acgraph",
        "kind": kind,
        "architecture": "topk",
        "model": meta["model"],
        "hook_in": hook_in,
        "hook_out": hook_out,
        "d_in": d_in,
        "width": width,
        "k": k,
        "batch_tokens": batch,
        "training_tokens": int(result.tokens),
        "steps": int(result.steps),
        "lr": lr,
        "lr_warmup_steps": warmup_steps,
        "buffer_tokens": buffer_tokens,
        "model_autocast": tcfg.model_autocast,
        "model_forward": tcfg.model_forward,
        "model_dtype": str(next(model.parameters()).dtype),
        "context_size": int(meta["context_size"]),
        "train_seconds": train_s,
        "tokens_per_second": result.tokens / train_s,
        "tokens_per_second_trainer_reported": float(result.tokens_per_second),
        "model_load_seconds": load_s,
        "peak_rss_mb": rss,
        "dead_fraction_train": float(last.get("dead", float("nan"))),
        "fvu": acc.value(),
        "fvu_acgraph_metric": library_fvu,
        "l0": l0_sum / n,
        "dead_fraction_eval": float(1.0 - fired.float().mean()),
        "eval_tokens": n,
        "environment": pc.environment(["acgraph", "transformer-lens", "transformers", "torch"]),
    }


# ====================================================================== orchestration


def _worker(argv: list[str]) -> int:
    """``run.py ours-worker ...``: one acgraph training run in this process."""
    p = argparse.ArgumentParser(prog="run.py ours-worker")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--kind", choices=("sae", "transcoder"), required=True)
    p.add_argument("--hook-in", required=True)
    p.add_argument("--hook-out", required=True)
    for name in (
        "width",
        "k",
        "batch",
        "tokens",
        "warmup-steps",
        "buffer-tokens",
        "model-batch",
        "seed",
        "threads",
    ):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--decay-fraction", type=float, required=True)
    p.add_argument("--bf16", action="store_true", help="model forward under bf16 autocast")
    p.add_argument("--bf16-weights", action="store_true", help="model weights in bf16")
    p.add_argument("--forward", default="lean", help="acgraph's model forward")
    p.add_argument("--save-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t = time.perf_counter()
    record = train_ours(
        data_dir=a.data,
        kind=a.kind,
        hook_in=a.hook_in,
        hook_out=a.hook_out,
        width=a.width,
        k=a.k,
        batch=a.batch,
        tokens=a.tokens,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        decay_fraction=a.decay_fraction,
        buffer_tokens=a.buffer_tokens,
        model_batch=a.model_batch,
        seed=a.seed,
        save_dir=a.save_dir,
        bf16=a.bf16,
        bf16_weights=a.bf16_weights,
        forward=a.forward,
    )
    record["wall_seconds"] = time.perf_counter() - t
    record["environment"]["argv"] = sys.argv
    sys.path.insert(0, str(HERE))
    import peer_common as pc

    pc.write_json(a.out, record)
    print(
        f"[acgraph] {a.kind} {a.hook_in}: {record['tokens_per_second']:,.0f} tok/s, "
        f"FVU {record['fvu']:.4f}, L0 {record['l0']:.1f}, peak RSS {record['peak_rss_mb']:,.0f} MB"
    )
    return 0


def ensure_peers(names: list[str]) -> None:
    missing = [n for n in names if not (PEERS / n / ".installed").is_file()]
    if missing:
        subprocess.run(["bash", str(BENCH / "setup_peers.sh"), *missing], check=True)


def ensure_inputs(model: str, layers: list[int], data_dir: Path, remake: bool) -> dict:
    meta_path = data_dir / "meta.json"
    if not remake and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if set(layers) <= set(meta["layers"]):
            return meta
        layers = sorted(set(layers) | set(meta["layers"]))
    cmd = [
        str(OUR_PY),
        str(HERE / "make_inputs.py"),
        "--model",
        model,
        "--out",
        str(data_dir),
        "--layers",
        *map(str, layers),
    ]
    print("[run]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(meta_path.read_text())


LOADS: dict[str, dict[str, list[float]]] = {}


def run_logged(name: str, cmd: list[str], log: Path, timeout: int) -> int:
    print(f"[run] {name}: {' '.join(cmd)}", flush=True)
    load_before = list(os.getloadavg())
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    # The 1-minute load average says whether anything else was running (2 = both cores busy).
    LOADS[name] = {"before": load_before, "after": list(os.getloadavg())}
    tail = log.read_text(errors="replace").splitlines()[-1:] if log.is_file() else []
    print(
        f"[run] {name}: rc={rc} in {time.perf_counter() - t:.0f}s  {' '.join(tail)[:200]}",
        flush=True,
    )
    return rc


def commands(
    name: str, a: argparse.Namespace, layer: int, data_dir: Path, run_dir: Path, sae_hook: str
) -> list[str]:
    out = run_dir / f"{name}.json"
    shared = [
        "--width",
        str(a.width),
        "--k",
        str(a.k),
        "--batch",
        str(a.batch),
        "--tokens",
        str(a.tokens),
        "--lr",
        repr(a.lr),
        "--threads",
        str(a.threads),
        "--seed",
        str(a.seed),
        "--warmup-steps",
        str(a.warmup_steps),
        *(["--bf16"] if a.bf16 else []),
        *(["--bf16-weights"] if a.bf16_weights else []),
    ]
    if name == "saelens":
        return [
            str(PEER_PY["saelens"]),
            str(HERE / "peer_saelens.py"),
            "--data",
            str(data_dir),
            "--hook",
            sae_hook,
            "--buffer-tokens",
            str(a.buffer_tokens),
            "--decay-fraction",
            str(a.decay_fraction),
            *shared,
            "--out",
            str(out),
        ]
    if name == "sparsify":
        return [
            str(PEER_PY["sparsify"]),
            str(HERE / "peer_sparsify.py"),
            "--data",
            str(data_dir),
            "--layer",
            str(layer),
            *shared,
            "--out",
            str(out),
        ]
    kind = "sae" if name == "ours_sae" else "transcoder"
    hook_in = sae_hook if kind == "sae" else f"blocks.{layer}.ln2.hook_normalized"
    hook_out = sae_hook if kind == "sae" else f"blocks.{layer}.hook_mlp_out"
    return [
        str(OUR_PY),
        str(Path(__file__).resolve()),
        "ours-worker",
        "--data",
        str(data_dir),
        "--kind",
        kind,
        "--hook-in",
        hook_in,
        "--hook-out",
        hook_out,
        *shared,
        "--buffer-tokens",
        str(a.buffer_tokens),
        "--model-batch",
        str(a.model_batch),
        "--decay-fraction",
        str(a.decay_fraction),
        "--forward",
        a.forward,
        "--save-dir",
        str(run_dir / name),
        "--out",
        str(out),
    ]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compare(ours: dict | None, peer: dict | None, min_speedup: float) -> dict | None:
    if ours is None or peer is None:
        return None
    speed = _ratio(ours["tokens_per_second"], peer["tokens_per_second"])
    return {
        "tokens_per_second_ratio": speed,  # ours / peer (higher is better)
        "peak_rss_ratio": _ratio(ours["peak_rss_mb"], peer["peak_rss_mb"]),  # lower is better
        "fvu_ours": ours["fvu"],
        "fvu_peer": peer["fvu"],
        "fvu_ratio": _ratio(ours["fvu"], peer["fvu"]),  # lower is better
        "l0_ours": ours["l0"],
        "l0_peer": peer["l0"],
        "training_tokens_ours": ours["training_tokens"],
        "training_tokens_peer": peer["training_tokens"],
        "goal": f"tokens/s ratio >= {min_speedup} at FVU <= peer's",
        "goal_met": bool(speed is not None and speed >= min_speedup and ours["fvu"] <= peer["fvu"]),
    }


def summarize(
    model: str,
    layer: int,
    a: argparse.Namespace,
    meta: dict,
    run_dir: Path,
    sae_hook: str,
    ran: dict[str, int],
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dictionaries_{model}_layer{layer}{_suffix(a)}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    setting = {
        "model": model,
        "layer": layer,
        "sae_hook": sae_hook,
        "transcoder_hooks": [f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"],
        "width": a.width,
        "k": a.k,
        "batch_tokens": a.batch,
        "training_tokens": a.tokens,
        "lr": a.lr,
        "warmup_steps": a.warmup_steps,
        "decay_fraction": a.decay_fraction,
        "buffer_tokens": a.buffer_tokens,
        "torch_threads": a.threads,
        **({"bf16_autocast": True} if a.bf16 else {}),
        **({"bf16_weights": True} if a.bf16_weights else {}),
        "acgraph_forward": a.forward,
        "seed": a.seed,
        "context_size": meta["context_size"],
        "corpus": meta["corpus_description"],
        "eval_tokens": meta["n_eval_tokens"],
        "excluded_token_ids": meta["exclude_token_ids"],
    }
    # Keep earlier runs only when they were made with exactly this setting.
    same = previous.get("setting") == setting
    runs: dict[str, Any] = dict(previous.get("runs", {})) if same else {}
    for name in RUN_ORDER:
        f = run_dir / f"{name}.json"
        if name in ran and ran[name] == 0 and f.is_file():
            runs[name] = json.loads(f.read_text())
            runs[name]["machine_load_average"] = LOADS.get(name)
        elif name in ran:
            runs[name] = {"error": f"exit status {ran[name]}", "log": str(run_dir / f"{name}.log")}
    ok = {k: v for k, v in runs.items() if "error" not in v}
    summary = {
        "benchmark": "dictionaries",
        "command": "python bench/dictionaries/run.py " + " ".join(sys.argv[1:]),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "setting": setting,
        "runs": runs,
        "ratios": {
            "sae_vs_saelens": compare(ok.get("ours_sae"), ok.get("saelens"), 2.0),
            "transcoder_vs_sparsify": compare(ok.get("ours_transcoder"), ok.get("sparsify"), 1.0),
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SETTINGS), required=True)
    p.add_argument("--layer", type=int, default=None, help="default: the model's first setting")
    p.add_argument("--only", nargs="+", choices=RUN_ORDER, default=list(RUN_ORDER))
    p.add_argument(
        "--sae-hook",
        default="hook_resid_post",
        help="TransformerLens hook name within blocks.L for the SAE pair",
    )
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--buffer-tokens", type=int, default=65_536)
    p.add_argument("--model-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast where each trainer offers it: SAELens autocast_lm, sparsify's "
        "bf16 autocast (its GPU default), acgraph --model-autocast bfloat16",
    )
    p.add_argument(
        "--bf16-weights",
        action="store_true",
        help="the model itself in bf16 (no autocast): SAELens and acgraph only (sparsify "
        "feeds a bf16 model's outputs to its coder only under its coder autocast, --bf16)",
    )
    p.add_argument(
        "--forward",
        choices=["lean", "compiled", "transformer_lens"],
        default="lean",
        help="acgraph's model forward (acg train --forward); the peers run their own",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per trainer run")
    p.add_argument("--remake-inputs", action="store_true")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="inputs folder (default bench/peers/data/<model>)",
    )
    a = p.parse_args(argv)
    s = SETTINGS[a.model]
    layer = a.layer if a.layer is not None else s["layers"][0]
    for key in ("width", "k", "batch", "tokens"):
        if getattr(a, key) is None:
            setattr(a, key, s[key])
    if a.lr is None:
        a.lr = default_lr(a.width)
    sae_hook = f"blocks.{layer}.{a.sae_hook}"

    if a.bf16_weights and a.bf16:
        raise SystemExit("give --bf16 (autocast) or --bf16-weights, not both")
    if a.bf16_weights:
        a.only = [n for n in a.only if n in ("saelens", "ours_sae")]
    peers = [n for n in ("saelens", "sparsify") if n in a.only]
    ensure_peers(peers)
    data_dir = a.data_dir or PEERS / "data" / a.model
    meta = ensure_inputs(a.model, sorted(set(s["layers"]) | {layer}), data_dir, a.remake_inputs)
    if sae_hook not in _eval_keys(data_dir):
        meta = ensure_inputs(a.model, meta["layers"], data_dir, True)
    run_dir = PEERS / "runs" / f"{a.model}_L{layer}{_suffix(a)}"
    run_dir.mkdir(parents=True, exist_ok=True)

    ran: dict[str, int] = {}
    for name in RUN_ORDER:
        if name not in a.only:
            continue
        cmd = commands(name, a, layer, data_dir, run_dir, sae_hook)
        ran[name] = run_logged(name, cmd, run_dir / f"{name}.log", a.timeout)
    path = summarize(a.model, layer, a, meta, run_dir, sae_hook, ran)
    print(f"[run] wrote {path}")
    summary = json.loads(path.read_text())
    for name, r in summary["runs"].items():
        if "error" in r:
            print(f"  {name:16s} ERROR {r['error']} (see {r['log']})")
        else:
            print(
                f"  {name:16s} {r['tokens_per_second']:10,.0f} tok/s"
                f"  RSS {r['peak_rss_mb']:7,.0f} MB  FVU {r['fvu']:.4f}  L0 {r['l0']:5.1f}"
                f"  tokens {r['training_tokens']:,}"
            )
    return 0 if all(v == 0 for v in ran.values()) else 1


def _suffix(a: argparse.Namespace) -> str:
    """Standard runs (2 threads, fp32) have plain names; others say how they differ."""
    return (
        ("" if a.threads == 2 else f"_threads{a.threads}")
        + ("_bf16" if a.bf16 else "")
        + ("_bf16w" if a.bf16_weights else "")
        + ("" if a.forward == "lean" else f"_{a.forward}")
    )


def _trained(model: str, layer: int, name: str) -> Path | None:
    """Our saved dictionary from the last benchmark run (the 2-thread run preferred)."""
    exact = PEERS / "runs" / f"{model}_L{layer}" / name
    if (exact / "cfg.json").is_file():
        return exact
    hits = sorted(PEERS.glob(f"runs/{model}_L{layer}_*/{name}/cfg.json"))
    return hits[0].parent if hits else None


def _eval_keys(data_dir: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(data_dir / "eval_acts.safetensors"), framework="pt") as f:
        return set(f.keys())


# ====================================================================== interoperability


def interop_main(argv: list[str]) -> int:
    """``run.py interop``: our files in SAELens and circuit-tracer (see interop_*.py)."""
    p = argparse.ArgumentParser(prog="run.py interop")
    p.add_argument("--model", choices=sorted(SETTINGS), required=True)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--width", type=int, default=512, help="width of the random test sets")
    p.add_argument(
        "--transcoders",
        type=Path,
        default=None,
        help="folder of our trained transcoders (one SAELens-layout subfolder per "
        "layer, all layers) to export as a circuit-tracer set too",
    )
    p.add_argument("--data-dir", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE))
    import peer_common as pc
    from safetensors.torch import save_file

    from acgraph.dictionaries import (
        DictionaryConfig,
        SparseDictionary,
        capture_hooks,
        export_circuit_tracer,
        load_dictionary,
        save_dictionary,
    )
    from acgraph.models import load_model

    ensure_peers(["saelens", "circuit_tracer"])
    s = SETTINGS[a.model]
    layer = a.layer if a.layer is not None else s["layers"][0]
    data_dir = a.data_dir or PEERS / "data" / a.model
    meta = ensure_inputs(a.model, s["layers"], data_dir, False)
    out_dir = PEERS / "runs" / f"{a.model}_interop"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(str(data_dir / "model"))
    n_layers, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    tokens = pc.load_inputs(data_dir)["tokens"]["eval"][:8]
    keep = ~torch.isin(tokens, torch.tensor(meta["exclude_token_ids"])).reshape(-1)
    hooks = [
        h
        for i in range(n_layers)
        for h in (
            f"blocks.{i}.ln2.hook_normalized",
            f"blocks.{i}.hook_mlp_out",
            f"blocks.{i}.hook_resid_post",
        )
    ]
    with torch.no_grad():
        acts = {h: v.reshape(-1, d)[keep] for h, v in capture_hooks(model, tokens, hooks).items()}
    report: dict[str, Any] = {"model": a.model, "layer": layer, "checks": {}}

    def saelens_check(
        name: str,
        folder: Path,
        x: torch.Tensor,
        y: torch.Tensor,
        informational: bool = False,
        fvu_tolerance: float | None = None,
    ) -> None:
        dictionary = load_dictionary(folder)
        with torch.no_grad():
            ref = {"x": x.clone(), "y_hat": dictionary(x).contiguous(), "y": y.clone()}
            ref["l0"] = (dictionary.encode(x) != 0).sum(-1).double().mean().reshape(1)
        save_file(ref, str(out_dir / f"{name}.reference.safetensors"))
        rc = run_logged(
            name,
            [
                str(PEER_PY["saelens"]),
                str(HERE / "interop_saelens.py"),
                "--folder",
                str(folder),
                "--reference",
                str(out_dir / f"{name}.reference.safetensors"),
                "--out",
                str(out_dir / f"{name}.json"),
                *([] if fvu_tolerance is None else ["--fvu-tolerance", str(fvu_tolerance)]),
            ],
            out_dir / f"{name}.log",
            900,
        )
        f = out_dir / f"{name}.json"
        report["checks"][name] = json.loads(f.read_text()) if f.is_file() else {"rc": rc}
        report["checks"][name]["informational"] = informational

    # 1. SAELens: our trained SAE from the benchmark when there is one, else a random TopK SAE;
    #    and a (ReLU) transcoder, which SAELens 6.54 has a class for.
    hook = f"blocks.{layer}.hook_resid_post"
    trained = _trained(a.model, layer, "ours_sae")
    if trained is not None:
        sae_folder = trained
    else:
        sae = SparseDictionary(
            DictionaryConfig(
                kind="sae",
                d_in=d,
                d_sae=a.width,
                hook_in=hook,
                activation="topk",
                k=16,
                model_name=a.model,
            )
        )
        sae_folder = save_dictionary(sae, out_dir / "random_topk_sae")
    saelens_check("saelens_topk_sae", sae_folder, acts[hook], acts[hook])
    tc = SparseDictionary(
        DictionaryConfig(
            kind="transcoder",
            d_in=d,
            d_sae=a.width,
            activation="relu",
            model_name=a.model,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hooks_out=[f"blocks.{layer}.hook_mlp_out"],
        )
    )
    saelens_check(
        "saelens_relu_transcoder",
        save_dictionary(tc, out_dir / "random_relu_tc"),
        acts[f"blocks.{layer}.ln2.hook_normalized"],
        acts[f"blocks.{layer}.hook_mlp_out"],
    )
    trained_tc = _trained(a.model, layer, "ours_transcoder")
    if trained_tc is not None:  # a TopK transcoder: SAELens has no TopK transcoder class
        saelens_check(
            "saelens_topk_transcoder",
            trained_tc,
            acts[f"blocks.{layer}.ln2.hook_normalized"],
            acts[f"blocks.{layer}.hook_mlp_out"],
            informational=True,
        )

    trained_set = []
    if a.transcoders is not None:
        folders = sorted(
            (f for f in a.transcoders.iterdir() if (f / "cfg.json").is_file()),
            key=lambda f: int(load_dictionary(f).cfg.hook_in.split(".")[1]),
        )
        trained_set = [load_dictionary(f) for f in folders]
        # each trained transcoder's folder as it is, in SAELens: exact where SAELens has the
        # architecture; a TopK (skip) transcoder runs there as a JumpReLU one (per-latent
        # thresholds calibrated to TopK's firing rates), accepted within 0.05 FVU of ours
        for folder, dct in zip(folders, trained_set, strict=True):
            saelens_check(
                f"saelens_trained_{folder.name}",
                folder,
                acts[dct.cfg.hook_in],
                acts[dct.cfg.hook_out],
                fvu_tolerance=0.05,
            )

    # 2. circuit-tracer: a transcoder set covering every layer.
    def ct_check(
        name: str, dictionaries: list, fvu_tolerance: float | None = None, **export_kw
    ) -> None:
        folder = export_circuit_tracer(dictionaries, out_dir / name, **export_kw)
        ref = {}
        with torch.no_grad():
            for i, dct in enumerate(dictionaries):
                x = acts[f"blocks.{i}.ln2.hook_normalized"]
                ref[f"layer_{i}.x"] = x.clone()
                ref[f"layer_{i}.y_hat"] = dct(x).contiguous()
                ref[f"layer_{i}.y"] = acts[f"blocks.{i}.hook_mlp_out"].clone()
        save_file(ref, str(out_dir / f"{name}.reference.safetensors"))
        rc = run_logged(
            name,
            [
                str(PEER_PY["circuit_tracer"]),
                str(HERE / "interop_circuit_tracer.py"),
                "--transcoders",
                str(folder),
                "--model-dir",
                str(data_dir / "model"),
                "--reference",
                str(out_dir / f"{name}.reference.safetensors"),
                "--prompt-tokens",
                str(data_dir / "tokens.safetensors"),
                "--out",
                str(out_dir / f"{name}.json"),
                *([] if fvu_tolerance is None else ["--fvu-tolerance", str(fvu_tolerance)]),
            ],
            out_dir / f"{name}.log",
            1800,
        )
        f = out_dir / f"{name}.json"
        report["checks"][name] = json.loads(f.read_text()) if f.is_file() else {"rc": rc}

    relu_set = []
    for i in range(n_layers):
        dct = SparseDictionary(
            DictionaryConfig(
                kind="skip_transcoder",
                d_in=d,
                d_sae=a.width,
                activation="relu",
                model_name=a.model,
                hook_in=f"blocks.{i}.ln2.hook_normalized",
                hooks_out=[f"blocks.{i}.hook_mlp_out"],
            ),
            seed=i,
        )
        with torch.no_grad():  # make the skip path non-trivial so its layout is checked too
            dct.W_skip.normal_(0, 0.01, generator=torch.Generator().manual_seed(i))
            dct.b_enc.fill_(-0.05)
        relu_set.append(dct)
    ct_check("circuit_tracer_relu_skip_set", relu_set)
    if trained_set:
        # TopK runs in circuit-tracer 0.5.0 only as JumpReLU with the calibrated threshold: an
        # approximation, accepted when its FVU is within 0.05 of ours.
        if trained_set[0].cfg.activation == "topk":
            ct_check("circuit_tracer_trained_set", trained_set, 0.05, topk_as_jumprelu=True)
        else:
            ct_check("circuit_tracer_trained_set", trained_set)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dictionaries_interop_{a.model}.json"
    report["command"] = "python bench/dictionaries/run.py interop " + " ".join(argv)
    report["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[interop] wrote {path}")
    for name, r in report["checks"].items():
        note = " (informational)" if r.get("informational") else ""
        print(f"  {name:32s} ok={r.get('ok')}{note}  {r.get('error', '')}")
    required = [r for r in report["checks"].values() if not r.get("informational")]
    return 0 if all(r.get("ok") for r in required) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ours-worker":
        return _worker(argv[1:])
    if argv and argv[0] == "interop":
        return interop_main(argv[1:])
    return bench_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
