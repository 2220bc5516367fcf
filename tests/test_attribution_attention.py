"""Attention explained: per-head edge split and the exact QK decomposition, plus the organism's
key-value lookup recovered from its graph (value token -> answer through one head; that head's
QK story points at the matching key)."""

from __future__ import annotations

import pytest
import torch
from test_attribution import tiny

from acgraph.attribution import attribute, load_transcoders
from acgraph.attribution.attention import context, head_split, qk_story
from acgraph.errors import ConfigError

LOOKUP = "c 4 ; a 9 ; b 3 ; a ?"  # answer 9: the value after the earlier key "a"
VALUE_POS, KEY_POS, QUERY_KEY_POS = 5, 4, 10  # with <bos> at 0


@pytest.fixture(scope="module")
def lookup():
    from acgraph.models import load_model

    model = load_model("organism")
    ts = load_transcoders("organism", model)
    graph = attribute(model, ts, LOOKUP)
    return graph, context(model, ts, graph)


def test_head_split_sums_to_edges(lookup):
    graph, ctx = lookup
    feature_row = int((graph.feat_layer == 2).nonzero()[-1])
    for node in (graph.target_start, feature_row):
        labels, cols, parts = head_split(ctx, node)
        _, vals = graph.row(node)
        assert labels[0] == "residual" and len(labels) == len(set(labels))
        assert parts.shape == (len(labels), cols.shape[0])
        assert torch.allclose(parts.sum(0), vals, atol=1e-5 * float(vals.abs().max()))
        # only same-position sources can reach the target without an attention hop
        _, pos = graph.node_layer_pos(node)
        other = torch.tensor([graph.node_layer_pos(int(c))[1] != pos for c in cols])
        assert float(parts[0, other].abs().max()) == 0.0


@pytest.mark.parametrize("layer,head,key", [(0, 1, 3), (1, 1, 5), (2, 0, 5), (2, 3, 11)])
def test_qk_decomposition_sums_to_real_score(lookup, layer, head, key):
    graph, ctx = lookup
    story = qk_story(ctx, layer, head, graph.n_pos - 1, key)
    assert story.total == pytest.approx(story.score, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_qk_decomposition_tiny_models(kind):
    """GPT-2 style and Llama style (RMSNorm, rotary, grouped-query attention)."""
    model, ts = tiny(kind)
    tokens = torch.randint(1, 50, (10,), generator=torch.Generator().manual_seed(2))
    graph = attribute(model, ts, tokens)
    ctx = context(model, ts, graph)
    for layer, head, q, k in [(0, 0, 9, 4), (1, 3, 9, 2), (1, 1, 6, 6)]:
        story = qk_story(ctx, layer, head, q, k)
        assert story.total == pytest.approx(story.score, rel=1e-4, abs=1e-4)
        assert bool((story.key_nodes < graph.target_start).all())
    with pytest.raises(ConfigError):
        qk_story(ctx, 5, 0, 3, 2)
    with pytest.raises(ConfigError):
        qk_story(ctx, 0, 0, 2, 3)  # key after query


def test_organism_lookup_story(lookup):
    graph, ctx = lookup
    assert graph.token_strings[VALUE_POS] == "9" and graph.token_strings[KEY_POS] == "a"
    assert graph.token_strings[QUERY_KEY_POS] == "a"
    target = graph.target_start
    assert graph.targets[0].label.strip() == "9"  # the model answers the lookup
    labels, cols, parts = head_split(ctx, target)
    heads = [i for i, name in enumerate(labels) if name != "residual"]
    # the head carrying the value token's evidence into the answer logit ...
    value_col = [int(c) for c in cols].index(graph.token_start + VALUE_POS)
    best = max(heads, key=lambda i: float(parts[i, value_col]))
    layer, head = (int(x[1:]) for x in labels[best].split("."))
    # ... attends from the query position to the value token ...
    assert float(ctx.cap.patterns[layer, head, graph.n_pos - 1, VALUE_POS]) > 0.5
    # ... and the largest source of that attention edge is the value token itself
    top_source = int(cols[int(parts[best].argmax())])
    assert top_source == graph.token_start + VALUE_POS
    # QK story of that head: the key side is driven by the matching key "a" (the token before
    # the value, brought over by a previous-token head), the query side by the queried key
    story = qk_story(ctx, layer, head, graph.n_pos - 1, VALUE_POS)
    assert story.total == pytest.approx(story.score, rel=1e-4)
    key_top = int(story.key_nodes[int(story.key_terms().argmax())])
    query_top = int(story.query_nodes[int(story.query_terms().argmax())])
    assert key_top == graph.token_start + KEY_POS
    assert query_top == graph.token_start + QUERY_KEY_POS
    q_node, k_node, value = story.top_pairs(1)[0]
    assert (q_node, k_node) == (graph.token_start + QUERY_KEY_POS, graph.token_start + KEY_POS)
    assert value > 0
