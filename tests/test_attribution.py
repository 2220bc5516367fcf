"""Local attribution graphs: exactness invariants, pruning, files, bad input.

Invariants (ANCHORS.md), both to 1e-4 relative in fp32:
- second derivatives of every target w.r.t. the input vanish under freezing;
- each adjacency column predicts the change of every downstream feature pre-activation and
  target logit when its source is injected into the frozen ("replay") model.
Checked on the organism with its shipped skip transcoders and on two tiny random models (GPT-2
style with JumpReLU transcoders; Llama style: RMSNorm, rotary, grouped-query attention).
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from acgraph.attribution import (
    AttributionGraph,
    FeatureSpec,
    LogitDiffSpec,
    LogitSpec,
    attribute,
    load_transcoders,
)
from acgraph.attribution.build import active_sources
from acgraph.attribution.frozen import capture
from acgraph.attribution.prune import graph_scores, prune
from acgraph.attribution.replacement import frozen
from acgraph.dictionaries import DictionaryConfig, SparseDictionary
from acgraph.errors import ACGError, ArtifactError, ConfigError

PROMPT = "c 4 ; a 9 ; b 3 ; a ?"


@pytest.fixture(scope="module")
def organism():
    from acgraph.models import load_model

    torch.manual_seed(0)
    model = load_model("organism")
    return model, load_transcoders("organism", model)


def tiny(kind: str, seed: int = 0):
    """A random 2-layer model and random skip transcoders (JumpReLU for gpt2, ReLU for llama)."""
    torch.manual_seed(seed)
    common = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=32)
    if kind == "gpt2":
        cfg = HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN")
    else:
        cfg = HookedTransformerConfig(
            **common,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            n_key_value_heads=2,
            gated_mlp=True,
            rotary_dim=8,
        )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", "ln_final.w")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.split(".")[-1].startswith("b"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    dicts = []
    for layer in range(2):
        act = "jumprelu" if kind == "gpt2" else "relu"
        dcfg = DictionaryConfig(
            kind="skip_transcoder",
            d_in=32,
            d_sae=96,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hooks_out=[f"blocks.{layer}.hook_mlp_out"],
            activation=act,
            k=None,
            jumprelu_init_threshold=0.05 if act == "jumprelu" else None,
        )
        d = SparseDictionary(dcfg, seed=layer)
        with torch.no_grad():
            d.b_enc.copy_(0.05 * torch.randn(96))
            d.W_skip.copy_(0.1 * torch.randn(32, 32))
        dicts.append(d.eval().requires_grad_(False))
    return model, load_transcoders(dicts, model)


# ---------------------------------------------------------------- helpers


def target_values(graph: AttributionGraph, ts, rec: dict, logits: torch.Tensor) -> torch.Tensor:
    """Every feature row's pre-activation and every target's value, from a hooked run."""
    vals = []
    for r in range(graph.n_features):
        layer, pos = int(graph.feat_layer[r]), int(graph.feat_pos[r])
        x = rec[f"blocks.{layer}.{ts.input_hook}"][0, pos]
        vals.append(x @ ts[layer].W_enc[:, graph.feat_idx[r]])
    last = logits[0, -1]
    for t in graph.targets:
        if t.kind == "logit":
            vals.append(last[t.vocab_idx] - last.mean())
        elif t.kind == "feature":
            x = rec[f"blocks.{t.layer}.{ts.input_hook}"][0, t.position]
            vals.append(x @ ts[t.layer].W_enc[:, t.feature])
    return torch.stack(vals)


def source_vector(graph, ts, cap, model, node: int) -> tuple[str, int, torch.Tensor]:
    kind = graph.node_kind(node)
    layer, pos = graph.node_layer_pos(node)
    if kind == "feature":
        return (
            f"blocks.{layer}.hook_mlp_out",
            pos,
            graph.feat_act[node] * ts[layer].W_dec[graph.feat_idx[node]],
        )
    if kind == "error":
        src, _ = active_sources(ts, cap)
        return f"blocks.{layer}.hook_mlp_out", pos, src.errors[layer, pos]
    return "hook_embed", pos, model.W_E[graph.tokens[pos]]


# The replay model is exactly linear, so injecting ALPHA x the source vector and dividing by
# ALPHA measures the same column while keeping fp32 cancellation (the difference of two full
# forward passes) far below the 1e-4 tolerance.
ALPHA = 100.0


def check_injection(model, ts, graph: AttributionGraph, sources: list[int]) -> float:
    """Max relative error of predicted vs injected changes over ``sources`` columns."""
    cap = capture(model, ts, graph.tokens)
    rec0: dict = {}
    with torch.no_grad(), frozen(model, ts, cap, record=rec0):
        base_logits = model(graph.tokens[None])
    assert torch.allclose(base_logits[0], cap.logits, atol=1e-4)  # replay == real forward
    base = target_values(graph, ts, rec0, base_logits)
    rows = list(range(graph.n_features)) + list(range(graph.target_start, graph.n_nodes))
    dense = graph.dense()
    worst = 0.0
    for node in sources:
        hook, pos, vec = source_vector(graph, ts, cap, model, node)
        rec: dict = {}
        inject = {hook: [(pos, ALPHA * vec)]}
        with torch.no_grad(), frozen(model, ts, cap, record=rec, injections=inject):
            logits = model(graph.tokens[None])
        change = (target_values(graph, ts, rec, logits) - base) / ALPHA
        pred = dense[rows, node]
        scale = max(float(change.abs().max()), 1e-6)
        worst = max(worst, float((change - pred).abs().max()) / scale)
    return worst


def sample_sources(graph: AttributionGraph, n_feat: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randperm(graph.n_features, generator=g)[:n_feat].tolist()
    errs = [graph.error_start + layer * graph.n_pos + 3 for layer in range(graph.n_layers)]
    toks = [graph.token_start + p for p in (0, 2, graph.n_pos - 1)]
    return feats + errs + toks


# ---------------------------------------------------------------- invariants


def test_edges_predict_injected_changes_organism(organism):
    model, ts = organism
    graph = attribute(model, ts, PROMPT)
    assert graph.targets[0].kind == "logit" and graph.n_features > 0
    assert check_injection(model, ts, graph, sample_sources(graph)) < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_edges_predict_injected_changes_tiny(kind):
    model, ts = tiny(kind)
    tokens = torch.randint(1, 50, (12,), generator=torch.Generator().manual_seed(1))
    graph = attribute(model, ts, tokens, batch_size=7)  # several mixed-layer batches
    assert graph.n_features > 0
    assert check_injection(model, ts, graph, sample_sources(graph)) < 1e-4


def test_custom_targets_predict_injection(organism):
    model, ts = organism
    specs = [LogitDiffSpec("9", "3"), FeatureSpec(2, 8, 5)]
    graph = attribute(model, ts, PROMPT, targets=specs)
    assert [t.kind for t in graph.targets] == ["logit_diff", "feature"]
    cap = capture(model, ts, graph.tokens)
    rec0: dict = {}
    with torch.no_grad(), frozen(model, ts, cap, record=rec0):
        base = model(graph.tokens[None])
    nine, three = (model.tokenizer.encode(t)[0] for t in ("9", "3"))
    for node in sample_sources(graph):
        hook, pos, vec = source_vector(graph, ts, cap, model, node)
        rec: dict = {}
        inject = {hook: [(pos, ALPHA * vec)]}
        with torch.no_grad(), frozen(model, ts, cap, record=rec, injections=inject):
            lg = model(graph.tokens[None])
        diff = (lg - base)[0, -1] / ALPHA
        x = rec["blocks.2.ln2.hook_normalized"][0, 8] - rec0["blocks.2.ln2.hook_normalized"][0, 8]
        x = x / ALPHA
        got = torch.stack([diff[nine] - diff[three], x @ ts[2].W_enc[:, 5]])
        want = torch.tensor([graph.edge(graph.target_start + i, node) for i in range(2)])
        assert torch.allclose(got, want, atol=1e-4 * max(1.0, float(want.abs().max())))


def test_second_derivatives_vanish_under_freezing(organism):
    model, ts = organism
    graph = attribute(model, ts, PROMPT)
    tokens = graph.tokens
    delta = torch.zeros(1, tokens.shape[0], model.cfg.d_model, requires_grad=True)

    def run(freeze: bool) -> tuple[torch.Tensor, dict]:
        rec: dict = {}
        hooks = [("hook_embed", lambda t, hook: t + delta)]
        with model.hooks(fwd_hooks=hooks):
            if freeze:
                with frozen(model, ts, None, mode="detach", record=rec):
                    logits = model(tokens[None])
            else:
                logits = model(tokens[None])
                _, cache = model.run_with_cache(tokens[None])
        return logits, rec

    logits, rec = run(True)
    values = target_values(graph, ts, rec, logits)
    weights = torch.randn(values.shape[0], generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((values * weights).sum(), delta, create_graph=True)
    probe = torch.randn_like(grad)
    second = torch.autograd.grad((grad * probe).sum(), delta, allow_unused=True)[0]
    assert second is None or float(second.abs().max()) <= 1e-6 * float(grad.abs().max())
    # first derivatives are the token edges (gradient at the embedding x token vector)
    tok_edges = (grad[0] * model.W_E[tokens]).sum(-1).detach()  # [n], weighted over rows
    dense = graph.dense()
    rows = list(range(graph.n_features)) + list(range(graph.target_start, graph.n_nodes))
    want = weights @ dense[rows][:, graph.token_start : graph.target_start]
    assert torch.allclose(tok_edges, want, atol=1e-4 * float(want.abs().max()))
    # control: the unfrozen model is not linear
    logits = model(tokens[None], return_type="logits")
    with model.hooks(fwd_hooks=[("hook_embed", lambda t, hook: t + delta)]):
        logits = model(tokens[None])
    (g2,) = torch.autograd.grad(logits[0, -1].logsumexp(-1), delta, create_graph=True)
    s2 = torch.autograd.grad((g2 * probe).sum(), delta)[0]
    assert float(s2.detach().abs().max()) > 1e-3 * float(g2.detach().abs().max())


# ---------------------------------------------------------------- structure, pruning, files


def test_graph_layout_matches_circuit_tracer_conventions(organism):
    model, ts = organism
    graph = attribute(model, ts, PROMPT)
    n, L = graph.n_pos, graph.n_layers
    assert graph.n_nodes == graph.n_features + L * n + n + len(graph.targets)
    assert int(graph.tokens[0]) == model.tokenizer.bos_token_id
    assert bool((graph.feat_pos > 0).all())  # no feature nodes at the BOS position
    key = graph.feat_layer * 10**6 + graph.feat_pos * 10**4 + graph.feat_idx
    assert bool((key.diff() > 0).all())  # sorted by (layer, position, feature)
    # only structurally possible edges are stored, ascending within each row
    for r in torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[:20]:
        cols, _ = graph.row(int(r))
        assert bool((cols.diff() > 0).all())
        layer, pos = graph.node_layer_pos(int(r))
        for c in cols.tolist():
            cl, cp = graph.node_layer_pos(c)
            assert cl < layer and cp <= pos
    # error and token rows are empty; the organism's answer is almost certain
    assert int(graph.crow[graph.target_start] - graph.crow[graph.error_start]) == 0
    assert graph.targets[0].label.strip() == "9" and graph.targets[0].weight > 0.9


def _dense_prune(A: torch.Tensor, w: torch.Tensor, n_tok_tgt: int, n_feat: int, nt, et):
    """Circuit-tracer's dense algorithm, restated for the cross-check."""

    def norm(m):
        m = m.abs()
        return m / m.sum(1, keepdim=True).clamp(min=1e-10)

    def infl(m):
        cur = w @ m
        tot = cur.clone()
        while cur.any():
            cur = cur @ m
            tot += cur
        return tot

    def thr(s, t):
        s = torch.sort(s, descending=True).values
        c = s.double().cumsum(0) / s.double().sum()
        return s[min(int(torch.searchsorted(c, torch.tensor(t, dtype=torch.float64))), len(s) - 1)]

    ni = infl(norm(A))
    nm = ni >= thr(ni, nt)
    nm[-n_tok_tgt:] = True
    P = A.clone()
    P[~nm] = 0
    P[:, ~nm] = 0
    nP = norm(P)
    scores = nP * (infl(nP) + w)[:, None]
    em = scores >= thr(scores.flatten(), et)
    while True:
        old = nm.clone()
        em[~nm] = False
        em[:, ~nm] = False
        nm[:-n_tok_tgt] &= em[:, :-n_tok_tgt].any(0)
        nm[:n_feat] &= em[:n_feat].any(1)
        if torch.equal(old, nm):
            break
    return ni, nm


def test_prune_and_scores_match_dense_reference(organism):
    model, ts = organism
    graph = attribute(model, ts, PROMPT)
    A = graph.dense()
    w = torch.zeros(graph.n_nodes)
    w[graph.target_start :] = graph.target_weights
    ref_infl, ref_mask = _dense_prune(
        A, w, graph.n_pos + len(graph.targets), graph.n_features, 0.8, 0.98
    )
    res = prune(graph)
    assert torch.allclose(res.node_influence, ref_infl, rtol=1e-4, atol=1e-7)
    assert torch.equal(res.node_mask, ref_mask)
    assert res.n_nodes < graph.n_nodes and 0 < res.n_edges < graph.nnz
    replacement, completeness = graph_scores(graph)
    assert 0.0 < replacement <= 1.0 and 0.0 < completeness <= 1.0
    everything = prune(graph, 1.0, 1.0)
    assert everything.n_nodes >= res.n_nodes
    with pytest.raises(ConfigError):
        prune(graph, node_threshold=1.5)


def test_save_load_roundtrip(organism, tmp_path):
    model, ts = organism
    graph = attribute(model, ts, PROMPT, targets=[LogitSpec("9"), LogitSpec(7)])
    path = graph.save(tmp_path / "g.safetensors")
    back = AttributionGraph.load(path)
    assert torch.equal(back.val, graph.val) and torch.equal(back.crow, graph.crow)
    assert back.targets == graph.targets and back.token_strings == graph.token_strings
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ArtifactError):
        AttributionGraph.load(tmp_path / "bad.safetensors")


def test_bad_input_raises_acg_errors(organism):
    model, ts = organism
    with pytest.raises(ConfigError):
        attribute(model, ts, "   ")
    with pytest.raises(ConfigError):
        attribute(model, ts, list(range(1, 200)))  # longer than the context
    with pytest.raises(ConfigError):
        attribute(model, ts, [1, 500])  # outside the vocabulary
    with pytest.raises(ConfigError):
        attribute(model, ts, PROMPT, targets=[FeatureSpec(2, 3, 99999)])
    with pytest.raises(ConfigError):
        attribute(model, ts, PROMPT, targets=[LogitSpec("no-such-token")])
    other_model, other_ts = tiny("gpt2")
    with pytest.raises(ArtifactError):
        attribute(model, other_ts, PROMPT)  # transcoders of another model
    with pytest.raises(ArtifactError):
        load_transcoders(ts.dictionaries[:2], model)  # a layer missing
    with pytest.raises(ACGError):
        load_transcoders("/nonexistent/folder", model)
