"""circuit-tracer's side of the attribution benchmark (runs in bench/peers/circuit_tracer:
circuit-tracer 0.5.0, transformers 4.57; never imports acgraph).

    bench/peers/circuit_tracer/bin/python bench/attribution/run_ct.py \
        --data bench/peers/data/attribution --length 64 --out /tmp/ct_64 [--batch-size 512]

The replacement model is built as ANCHORS.md says: a hand-made HookedTransformerConfig,
``TransformerLensReplacementModel.from_config``, unprocessed weights (TransformerLens's
converters), the transcoder set loaded with circuit-tracer's own ``load_transcoders``, token ids
passed with the BOS already prepended. Writes ``graph.safetensors`` (the dense adjacency and the
node sets) and ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dictionaries"))
import peer_common as pc  # noqa: E402

pc.set_offline_env()

import torch  # noqa: E402


def build(model_dir: Path, tc_dir: Path):
    import yaml
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.utils.hf_utils import load_transcoders
    from transformers import AutoModelForCausalLM

    config = dict(yaml.safe_load((tc_dir / "config.yaml").read_text()))
    config["transcoders"] = [str(tc_dir / Path(p).name) for p in config["transcoders"]]
    config.setdefault("repo_id", "")
    transcoders = load_transcoders(
        config,
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    cfg, _ = pc.hooked_config_from_hf(model_dir)
    model = TransformerLensReplacementModel.from_config(cfg, transcoders)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    state = pc.convert_weights(hf, cfg)
    own = dict(model.named_parameters())
    renamed = {}
    for name, tensor in state.items():
        if name not in own:
            for a, b in ((".mlp.", ".mlp.old_mlp."), ("unembed.", "unembed.old_unembed.")):
                if name.replace(a, b, 1) in own:
                    name = name.replace(a, b, 1)
                    break
        renamed[name] = tensor
    for name, param in own.items():
        if not name.startswith("transcoders.") and name not in renamed:
            renamed[name] = torch.zeros_like(param)
    model.load_state_dict(renamed, strict=False)
    model.tokenizer = pc.load_tokenizer(model_dir)
    model.eval()
    del hf
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-prune", action="store_true", help="skip prune_graph/scores (memory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from circuit_tracer import attribute
    from safetensors.torch import save_file

    name = args.model or ("organism" if args.length <= 128 else "organism_ctx256")
    model = build(args.data / name, args.data / "transcoders")
    ids = json.loads((args.data / "prompts.json").read_text())[str(args.length)]
    tokens = torch.tensor(ids)
    attribute(tokens[:8], model, batch_size=args.batch_size)  # warm-up
    before = pc.peak_rss_mb()
    t0 = time.perf_counter()
    graph = attribute(tokens, model, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    peak = pc.peak_rss_mb()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = {}
    scores = {}
    if not args.no_prune:  # after timing: circuit-tracer's own pruning and scores
        from circuit_tracer.graph import compute_graph_scores, prune_graph

        node_mask, edge_mask, _ = prune_graph(graph, 0.8, 0.98)
        extra = {"node_mask": node_mask.to(torch.uint8).contiguous()}
        rep, comp = compute_graph_scores(graph)
        scores = {
            "replacement_score": rep,
            "completeness_score": comp,
            "pruned_nodes": int(node_mask.sum()),
            "pruned_edges": int(edge_mask.sum()),
        }
    save_file(
        {
            **extra,
            "adjacency": graph.adjacency_matrix.contiguous(),
            "active_features": graph.active_features.contiguous(),
            "activation_values": graph.activation_values.contiguous(),
            "selected_features": graph.selected_features.contiguous(),
            "logit_probabilities": graph.logit_probabilities.contiguous(),
            "logit_ids": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
            "input_tokens": graph.input_tokens.contiguous(),
        },
        str(args.out / "graph.safetensors"),
    )
    n = graph.adjacency_matrix.shape[0]
    result = {
        "tool": "circuit-tracer",
        "model": name,
        "length": args.length,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "n_features": int(graph.active_features.shape[0]),
        "n_nodes": n,
        "adjacency_mb": n * n * 4 / 2**20,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        **scores,
        "environment": pc.environment(
            ["circuit-tracer", "transformer-lens", "transformers", "torch"]
        ),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}))


if __name__ == "__main__":
    main()
