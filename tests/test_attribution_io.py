"""Graph JSON (circuit-tracer/Neuronpedia schema), interventions, and `acg attribute`."""

from __future__ import annotations

import json

import pytest
import torch

from acgraph.attribution import attribute, load_transcoders
from acgraph.attribution.export import graph_json, write_graph_json
from acgraph.attribution.interventions import Intervention, ablate, generate, intervene
from acgraph.attribution.prune import prune
from acgraph.cli import main
from acgraph.errors import ConfigError

PROMPT = "c 4 ; a 9 ; b 3 ; a ?"
NODE_KEYS = {
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
}


@pytest.fixture(scope="module")
def setup():
    from acgraph.models import load_model

    model = load_model("organism")
    ts = load_transcoders("organism", model)
    return model, ts, attribute(model, ts, PROMPT)


def test_graph_json_schema(setup, tmp_path):
    model, ts, graph = setup
    res = prune(graph)
    data = graph_json(graph, "lookup", result=res, vocab_size=model.cfg.d_vocab)
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert meta["slug"] == "lookup" and meta["prompt_tokens"] == graph.token_strings
    assert meta["node_threshold"] == 0.8
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(set(n) >= NODE_KEYS for n in data["nodes"])
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert kinds <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == graph.n_pos
    assert data["links"] and all(e["source"] in ids and e["target"] in ids for e in data["links"])
    # edge weights are the graph's: pick one link and look it up
    link = data["links"][0]
    by_id = {graph_json_id(graph, i, model): i for i in range(graph.n_nodes)}
    assert graph.edge(by_id[link["target"]], by_id[link["source"]]) == pytest.approx(link["weight"])
    path = write_graph_json(tmp_path, data)
    write_graph_json(tmp_path, {**data, "metadata": {**meta, "slug": "other"}})
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["lookup", "other"]
    assert json.loads(path.read_text())["metadata"]["slug"] == "lookup"
    with pytest.raises(ConfigError):
        graph_json(graph, "bad slug/..")


def graph_json_id(graph, i, model):
    from acgraph.attribution.export import _node

    return _node(graph, i, 0.0, model.cfg.d_vocab)["node_id"]


def test_constrained_intervention_equals_graph_edge(setup):
    model, ts, graph = setup
    cols, vals = graph.row(graph.target_start)
    feats = cols < graph.n_features
    best = int(vals[feats].abs().argmax())
    node, edge = int(cols[feats][best]), float(vals[feats][best])
    layer, pos = graph.node_layer_pos(node)
    iv = ablate(layer, int(graph.feat_idx[node]), [pos])
    res = intervene(model, ts, PROMPT, [iv], constrained_layers=range(model.cfg.n_layers))
    change = res.logits[-1] - res.clean_logits[-1]
    tok = graph.targets[0].vocab_idx
    # only this feature's direct edge acts (every layer frozen): the demeaned logit moves by -edge
    assert float(change[tok] - change.mean()) == pytest.approx(-edge, rel=1e-4, abs=1e-4)
    free = intervene(
        model, ts, PROMPT, [Intervention(layer, int(graph.feat_idx[node]), 3.0, "scale", (pos,))]
    )
    assert not torch.allclose(free.logits, free.clean_logits)
    assert len(free.top_changes(3)) == 3
    with pytest.raises(ConfigError):
        intervene(model, ts, PROMPT, [Intervention(0, 5000)])
    with pytest.raises(ConfigError):
        intervene(model, ts, PROMPT, [Intervention(0, 1, positions=(99,))])


def test_generate_under_intervention(setup):
    model, ts, graph = setup
    clean = generate(model, ts, PROMPT, max_new_tokens=2)
    assert model.to_string(clean[graph.n_pos :].tolist()).split()[0] == "9"
    # ablating every feature the answer logit reads at the last position changes the output
    cols, vals = graph.row(graph.target_start)
    feats = [
        (int(graph.feat_layer[c]), int(graph.feat_idx[c]))
        for c in cols.tolist()
        if c < graph.n_features and int(graph.feat_pos[c]) == graph.n_pos - 1
    ]
    ivs = [Intervention(layer, f, 0.0, "set", (graph.n_pos - 1,)) for layer, f in feats]
    out = generate(model, ts, PROMPT, ivs, max_new_tokens=1)
    assert out.shape[0] == graph.n_pos + 1


def test_cli_attribute(tmp_path, capsys):
    rc = main(
        [
            "attribute",
            "--model",
            "organism",
            "--transcoders",
            "organism",
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path),
            "--slug",
            "lk",
            "--qk",
            "2",
            "0",
            "11",
            "5",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.index("QK")])
    assert summary["pruned_nodes"] > 0 and (tmp_path / "lk.json").is_file()
    assert (tmp_path / "lk.safetensors").is_file() and (tmp_path / "graph-metadata.json").is_file()
    assert "tok 'a'@10 x tok 'a'@4" in out
    # the QK story travels in the graph JSON too, with the graph's node ids
    data = json.loads((tmp_path / "lk.json").read_text())
    (story,) = data["qk_stories"]
    assert (story["layer"], story["head"], story["query_pos"], story["key_pos"]) == (2, 0, 11, 5)
    assert story["score"] == pytest.approx(story["sum_of_terms"], rel=1e-4, abs=1e-4)
    labels = [(p["query"]["label"], p["key"]["label"]) for p in story["top_pairs"]]
    assert ("tok 'a'@10", "tok 'a'@4") in labels
    key_a = next(p["key"] for p in story["top_pairs"] if p["key"]["label"] == "tok 'a'@4")
    assert key_a["node_id"].startswith("E_") and key_a["node_id"].endswith("_4")  # embedding
    assert story["query_terms"] and story["key_terms"]
    rc = main(
        [
            "attribute",
            "--model",
            "organism",
            "--transcoders",
            str(tmp_path / "nope"),
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
