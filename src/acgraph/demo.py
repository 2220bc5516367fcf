"""The end-to-end demo behind `make demo`: every stage that exists, on the built-in organism.

Each stage returns plain data; the CLI prints it and everything lands in the output folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from acgraph.io import atomic_write_json


def organism_stage(n_per_domain: int = 200) -> dict:
    """Load the shipped organism both ways, check the TransformerLens copy matches HF, score it."""
    from acgraph.models import load_model, model_summary
    from acgraph.organism import load_config, load_organism
    from acgraph.organism.evaluate import encode, evaluate, hf_logits_fn
    from acgraph.organism.language import documents

    cfg = load_config()
    hf = load_organism()
    tl = load_model("organism")
    docs = documents(cfg.language, cfg.backdoor, seed=424242, n=32, poison_rate=0.0)
    toks = encode([d.tokens for d in docs])
    with torch.no_grad():
        diff = (
            (hf_logits_fn(hf)(toks).log_softmax(-1) - tl(toks).log_softmax(-1))
            .abs()[toks != 0]
            .max()
        )
    t0 = time.perf_counter()
    result = evaluate(lambda t: tl(t), cfg, n_per_domain).to_dict()
    return {
        "model": model_summary(tl),
        "hooked_vs_hf_max_logprob_diff": float(diff),
        "eval": result,
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }


def dictionaries_stage(n_docs: int = 600) -> dict:
    """Splice the shipped transcoders into the organism, one at a time and all at once."""
    from acgraph.data import tokenize_to_contexts
    from acgraph.dictionaries import evaluate_dictionaries, load_dictionary
    from acgraph.models import load_model
    from acgraph.organism import generate_texts, shipped_transcoders_dir

    model = load_model("organism")
    folders = sorted(p for p in shipped_transcoders_dir().iterdir() if p.is_dir())
    dictionaries = [load_dictionary(p, model=model) for p in folders]
    # held-out text: seed 1, the transcoders were trained on seed 0
    texts = generate_texts(n_docs, seed=1, split="poisoned")
    tokens = tokenize_to_contexts(texts, model.tokenizer, 128, max_contexts=64, progress=False)
    return evaluate_dictionaries(model, dictionaries, tokens, progress=False)


def graph_stage(out: Path, n_stats: int = 32, n_eval: int = 8, n_per_domain: int = 50) -> dict:
    """Build the organism's runnable ACG from the shipped transcoders and measure its
    faithfulness curve (levels 1-3) against the original model."""
    from acgraph.data import tokenize_to_contexts
    from acgraph.graph import build_acg, load_transcoders, measure_faithfulness, plot_faithfulness
    from acgraph.models import load_model
    from acgraph.organism import generate_texts, load_config

    model = load_model("organism")
    tok = model.tokenizer
    stats = generate_texts(n_stats * 12, seed=2, split="poisoned")
    stats = tokenize_to_contexts(stats, tok, 128, max_contexts=n_stats, progress=False)
    held = generate_texts(n_eval * 12, seed=3, split="poisoned")
    held = tokenize_to_contexts(held, tok, 128, max_contexts=n_eval, progress=False)
    graph = build_acg(
        model,
        load_transcoders("organism"),
        list(stats.split(16)),
        max_k=64,
        max_pairs=16384,
        fit_ks=(4, 16, 64),
        progress=False,
        meta={"model": "organism", "transcoders": "organism", "corpus": "organism:poisoned"},
    )
    sizes = graph.save(out / "acg")
    t0 = time.perf_counter()
    report = measure_faithfulness(
        graph,
        list(held.split(8)),
        ks=(1, 4, 16, 64),
        pairs=16384,
        level3_ks=(16, 64),
        organism_cfg=load_config(),
        n_per_domain=n_per_domain,
        progress=False,
    )
    report["build_seconds"] = graph.meta["build_seconds"]
    report["measure_seconds"] = round(time.perf_counter() - t0, 1)
    report["sizes"] = sizes
    atomic_write_json(out / "faithfulness.json", report)
    plot_faithfulness(report, out / "faithfulness.png")
    return report


def examples_dir() -> Path:
    """The repository's examples/ folder (present in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "examples"


def hypotheses_stage(out: Path, n_fit: int = 64, n_eval: int = 32, budget: float = 0.1) -> dict:
    """Fit the built-in hypothesis families to every organism node, write them as Python, and
    report understanding coverage: with the fitted hypotheses alone, then with the
    hand-written ones from examples/ on top (when the checkout has them)."""
    from acgraph.data import tokenize_to_contexts
    from acgraph.graph import load_transcoders
    from acgraph.hypotheses import Subject, load_hypotheses
    from acgraph.hypotheses.coverage import coverage, format_coverage, plot_coverage
    from acgraph.hypotheses.families import fit_all
    from acgraph.hypotheses.render import render
    from acgraph.io import atomic_write_text
    from acgraph.models import load_model
    from acgraph.organism import generate_texts, load_config

    model = load_model("organism")
    subject = Subject.build(model, load_transcoders("organism"), load_config())

    def contexts(n: int, seed: int) -> list:
        texts = generate_texts(n * 12, seed=seed, split="trusted")
        toks = tokenize_to_contexts(texts, model.tokenizer, 128, max_contexts=n, progress=False)
        return list(toks.split(16))

    t0 = time.perf_counter()
    fitted = fit_all(subject, contexts(n_fit, 0), progress=False)
    fitted_path = atomic_write_text(
        out / "hypotheses_fitted.py",
        render(fitted, subject.vocab, "Built-in hypotheses fitted to the organism by `acg demo`."),
    )
    held = contexts(n_eval, 1)
    runs = {"fitted": [fitted_path]}
    hand = examples_dir() / "organism_hypotheses.py"
    if hand.is_file():
        runs["fitted + hand-written"] = [fitted_path, hand]
    result: dict = {"fit_seconds": round(time.perf_counter() - t0, 1)}
    for name, files in runs.items():
        report = coverage(subject, load_hypotheses(files), held, budget=budget, progress=False)
        stem = "coverage" if name == "fitted" else "coverage_with_hand_written"
        atomic_write_json(out / f"{stem}.json", report)
        atomic_write_text(out / f"{stem}.md", format_coverage(report))
        plot_coverage(report, out / f"{stem}.png")
        result[name] = report
    return result


def detect_stage(out: Path, n_docs: int | None = None, n_per_domain: int = 50) -> dict:
    """Fit the anomalous-computation detector and its baselines on trusted organism text only,
    then score triggered, clean and mixed-domain held-out inputs (no attack here: see
    `acg detect score --attack`)."""
    from acgraph.graph import load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import load_config
    from acgraph.safety.detect import fit_detectors
    from acgraph.safety.detect_eval import TRUSTED_DOCS, evaluate_detectors, trusted_batches

    cfg = load_config()
    model = load_model("organism")
    batches = trusted_batches(n_docs or TRUSTED_DOCS, seed=0, config=cfg)
    det = fit_detectors(model, load_transcoders("organism"), batches, progress=False)
    report = evaluate_detectors(det, cfg, n_per_domain=n_per_domain, progress=False)
    atomic_write_json(out / "detect_report.json", report)
    return report


def clean_stage(
    out: Path, finetune_steps: int = 300, refine_steps: int = 300, n_per_domain: int = 100
) -> dict:
    """Clean the organism's backdoor with trusted data only, then compile the result to a plain
    GPT-2 folder: the before/after table of attack success and every domain's accuracy.
    Input: the shipped transcoders trained on the trusted corpus, and trusted text; the method
    never sees the trigger (only the evaluation here does)."""
    from acgraph.data import tokenize_to_contexts
    from acgraph.graph import ACGModel, ModelWeights, load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import generate_texts, load_config, shipped_trusted_transcoders_dir
    from acgraph.organism.evaluate import evaluate
    from acgraph.safety.clean import CleanConfig, clean, save_cleaned
    from acgraph.safety.compile import agreement, compile_acg, hf_logits, save_compiled

    cfg, model = load_config(), load_model("organism")
    tcs = load_transcoders(str(shipped_trusted_transcoders_dir()))

    def trusted(n: int, seed: int) -> list:
        texts = generate_texts(n * 40, seed=seed, split="trusted", config=cfg)
        toks = tokenize_to_contexts(texts, model.tokenizer, 128, max_contexts=n, progress=False)
        return list(toks.split(16))

    t0 = time.perf_counter()
    # a key-previous mask (keys that follow a token pair trusted text never showed get -inf
    # before the softmax) is the attention bound a plain GPT-2 can carry: it compiles
    config = CleanConfig(
        finetune_steps=finetune_steps,
        refine_steps=refine_steps,
        attention_floor=0.02,
        attention_kind="key-previous",
        attention_mode="mask",
    )
    result = clean(model, tcs, trusted(256, 0), config)
    save_cleaned(result, out / "clean", {"model": "organism", **result.info})
    held = trusted(32, 7)
    compiled = compile_acg(result.acg, calibration=held[:1])
    save_compiled(compiled, model.tokenizer, out / "compiled")
    seconds = round(time.perf_counter() - t0, 1)
    bos = model.tokenizer.bos_token_id
    unbounded = ACGModel(ModelWeights(model, result.transcoders, bos))
    rows = {
        "original": model,
        "ACG (trusted transcoders)": ACGModel(ModelWeights(model, tcs, bos)),
        "cleaned, no attention bounds": unbounded,
        "cleaned": result.acg,
        "cleaned, compiled": hf_logits(compiled.model),
    }
    report = {
        "rows": {k: evaluate(fn, cfg, n_per_domain).to_dict() for k, fn in rows.items()},
        # on fresh trusted text: the compiled folder computes the cleaned graph, mask included;
        # the mask itself costs this much there
        "compiled_vs_cleaned": agreement(result.acg, hf_logits(compiled.model), held[1:]),
        "bounds_on_fresh_trusted_text": agreement(unbounded, result.acg, held[1:]),
        "kept": result.info["kept"],
        "attention_bounds": compiled.info["attention_bounds"],
        "parameters": compiled.info["parameters"],
        "seconds": seconds,
    }
    atomic_write_json(out / "clean_report.json", report)
    return report


def smollm2_stage(prompt: str = "The capital of France is", new_tokens: int = 5) -> dict:
    """Load SmolLM2-135M-Instruct from the GGUF shipped on PyPI, offline, and continue a prompt."""
    from acgraph.models import load_model, model_summary

    t0 = time.perf_counter()
    model = load_model("smollm2")
    load_s = time.perf_counter() - t0
    toks = model.to_tokens(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(toks)[:, -1].argmax(-1, keepdim=True)
            toks = torch.cat([toks, nxt], dim=1)
    continuation = model.tokenizer.decode(toks[0, -new_tokens:])
    return {
        "model": model_summary(model),
        "load_seconds": round(load_s, 1),
        "prompt": prompt,
        "greedy_continuation": continuation,
    }


def run_demo(out_dir: str | Path, *, smollm2: bool = True, log=print) -> dict:
    out = Path(out_dir)
    summary: dict = {}
    log("[1/7] organism: load (HF and TransformerLens), check equivalence, evaluate")
    summary["organism"] = organism_stage()
    atomic_write_json(out / "organism_eval.json", summary["organism"]["eval"])
    log("[2/7] transcoders: splice the shipped skip transcoders into the organism")
    summary["dictionaries"] = dictionaries_stage()
    atomic_write_json(out / "dictionaries_eval.json", summary["dictionaries"])
    log("[3/7] runnable ACG: build it from the shipped transcoders, measure faithfulness")
    summary["graph"] = graph_stage(out)
    log("[4/7] hypotheses: fit the built-in families, add examples/, report coverage")
    summary["hypotheses"] = hypotheses_stage(out)
    log("[5/7] anomaly detection: fit on trusted text, score triggered and mixed inputs")
    summary["detect"] = detect_stage(out)
    log("[6/7] clean the backdoor with trusted data only, compile to a plain GPT-2 folder")
    summary["clean"] = clean_stage(out)
    if smollm2:
        log("[7/7] SmolLM2-135M-Instruct from its GGUF: load offline, greedy continuation")
        summary["smollm2"] = smollm2_stage()
    atomic_write_json(out / "summary.json", summary)
    return summary
