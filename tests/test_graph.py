"""The runnable ACG: exactness of every level's algebra, pruning, files, faithfulness, explain."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from acgraph.dictionaries.config import DictionaryConfig
from acgraph.dictionaries.dictionary import SparseDictionary
from acgraph.dictionaries.metrics import splice_hooks
from acgraph.errors import ArtifactError, ConfigError
from acgraph.graph import (
    ACGModel,
    ModelWeights,
    Replacement,
    build_acg,
    explain_feature,
    load_acg,
    load_transcoders,
    measure_faithfulness,
    parse_feature,
    plot_faithfulness,
)
from acgraph.graph.prune import full_edges, rank_pairs, select_pairs

BOS = 1
TOL = 1e-4


def _randomize(model: HookedTransformer, seed: int) -> HookedTransformer:
    """Non-trivial norm weights and biases everywhere (HookedTransformer inits them to 1 / 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) or ".b_" in name or name.endswith("b_U"):
                base = 1.0 if name.endswith(".w") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


def tiny_gpt2() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=24, d_head=8, n_heads=4, d_mlp=64, d_vocab=40,
        act_fn="gelu_new", normalization_type="LN", seed=0,
    )  # fmt: skip
    return _randomize(HookedTransformer(cfg), 1)


def tiny_llama() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=24, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=64,
        d_vocab=40, act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=8, final_rms=True, seed=0,
    )  # fmt: skip
    return _randomize(HookedTransformer(cfg), 2)


def random_transcoders(model: HookedTransformer, specs) -> dict[int, SparseDictionary]:
    out = {}
    for layer, (kind, act) in enumerate(specs):
        cfg = DictionaryConfig(
            kind=kind, d_in=model.cfg.d_model, d_sae=48, activation=act, k=6,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hooks_out=[f"blocks.{layer}.hook_mlp_out"],
        )  # fmt: skip
        d = SparseDictionary(cfg, seed=layer)
        gen = torch.Generator().manual_seed(10 + layer)
        with torch.no_grad():
            d.b_enc.copy_(0.1 * torch.randn(d.d_sae, generator=gen))
            d.b_dec.copy_(0.1 * torch.randn(d.d_out, generator=gen))
            if d.W_skip is not None:
                d.W_skip.copy_(0.1 * torch.randn(d.W_skip.shape, generator=gen))
        d.eval()
        out[layer] = d
    return out


def tokens(n: int = 6, length: int = 20, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    t = torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t


def spliced_logits(model, transcoders, toks) -> torch.Tensor:
    """The reference of level 1: every MLP replaced by its transcoder, except at the BOS."""
    keep = torch.ones_like(toks, dtype=torch.bool)
    keep[:, 0] = False
    with torch.no_grad():
        return model.run_with_hooks(toks, fwd_hooks=splice_hooks(list(transcoders.values()), keep))


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger tensor's scale."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


CASES = {
    "gpt2-skip": (tiny_gpt2, [("skip_transcoder", "topk"), ("transcoder", "jumprelu")]),
    "llama-rotary": (tiny_llama, [("transcoder", "relu"), ("skip_transcoder", "topk")]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    make_model, specs = CASES[request.param]
    model = make_model()
    tcs = random_transcoders(model, specs)
    return model, tcs, ModelWeights(model, tcs, BOS)


# ---------------------------------------------------------------------- level 1


def test_level1_equals_model_with_transcoders_spliced(case):
    model, tcs, weights = case
    toks = tokens()
    ref = spliced_logits(model, tcs, toks)
    assert close(ACGModel(weights)(toks), ref) < TOL


def test_all_edges_compute_the_same_features_as_the_dense_graph(case):
    """Every feature from its (channel, source) in-edges with virtual weights: the OV expansion
    through each head, the skip channel, the value bias slot, the const and bos nodes."""
    model, tcs, weights = case
    toks = tokens(seed=3)
    dense = ACGModel(weights).run(toks)
    edges = {i: full_edges(weights, i) for i in range(weights.layout.n_layers)}
    by_edges = ACGModel(weights, edges).run(toks)
    for layer in range(weights.layout.n_layers):
        assert close(by_edges.pre[layer][:, 1:], dense.pre[layer][:, 1:]) < TOL
    assert close(by_edges.logits, spliced_logits(model, tcs, toks)) < TOL


def test_weights_of_chosen_sources_are_rows_of_the_full_matrix(case):
    """Ranking forms weights only for sources seen in the statistics: those rows (bias slot
    included, any order) equal the full matrix's, for every kind of channel."""
    _, _, weights = case
    layer = weights.layout.n_layers - 1
    gen = torch.Generator().manual_seed(0)
    for channel in weights.layout.channels(layer):
        full = weights.channel_weights(channel, layer)
        rows = torch.randperm(full.shape[0], generator=gen)[:7]
        rows[0] = full.shape[0] - 1  # the channel-bias slot
        assert close(weights.channel_weights(channel, layer, rows), full[rows]) < TOL


def test_statistics_of_unseen_tokens_are_zero_and_of_seen_ones_exact(case):
    """Statistics are gathered over the tokens a batch holds; every other token's are zero,
    and the rest equal a direct computation over all slots."""
    from acgraph.graph.stats import collect_stats

    _, _, weights = case
    toks = tokens(n=3, vocab=20, seed=5)  # ids < 20 of the vocabulary of 40+
    acg = ACGModel(weights)
    stats = collect_stats(acg, [toks], qk=False, progress=False)
    layer = weights.layout.n_layers - 1
    trace = acg.run(toks)
    w = trace.s2[layer][:, 1:, None]
    for c, channel in enumerate(weights.layout.channels(layer)):
        slots = torch.arange(weights.layout.channel_size(channel))
        g = (acg.gated(trace, channel, slots)[:, 1:] / w).flatten(0, 1)
        assert close(stats.mean_abs[(layer, c)], g.abs().mean(0)) < TOL
        assert close(stats.mean_sq[(layer, c)], g.pow(2).mean(0)) < TOL
        unseen = torch.ones(weights.layout.d_vocab, dtype=torch.bool)
        unseen[toks.unique()] = False
        assert float(stats.mean_abs[(layer, c)][: weights.layout.d_vocab][unseen].abs().max()) == 0


@pytest.mark.parametrize("max_k", [3, 12])
def test_ranked_edges_are_every_features_top_k_of_all_candidates(case, max_k):
    """rank_edges skips sources whose bound cannot beat a feature's k-th best so far; the result
    must equal scoring every (channel, source) candidate and taking each feature's top k."""
    from acgraph.graph.prune import rank_edges
    from acgraph.graph.stats import collect_stats

    _, _, weights = case
    stats = collect_stats(ACGModel(weights), [tokens(n=3, seed=4)], qk=False, progress=False)
    layer = weights.layout.n_layers - 1
    scores, total = [], 0
    for c, channel in enumerate(weights.layout.channels(layer)):
        W = weights.channel_weights(channel, layer)  # [slots, features]
        scores.append(W.abs() * stats.std((layer, c))[:, None])
        total = total + (W * stats.mean[(layer, c)][:, None]).sum(0)
    want = torch.cat(scores).topk(max_k, dim=0).values.T  # [features, max_k]
    got = rank_edges(weights, stats, layer, max_k)
    assert got.importance.shape == want.shape
    assert close(got.importance, want) < TOL
    assert close(got.total_mean, total) < TOL
    slots = torch.cat(scores)  # each kept edge's own score, looked up by its index
    assert close(slots.gather(0, got.index.T).T, got.importance) < TOL


def _all_pairs(weights, stats, n=None):
    """Level 3 with every query-key source pair kept (or the top ``n``), for every head."""
    n = n or weights.layout.space(weights.layout.head_site(weights.layout.n_layers - 1)).size ** 2
    return {
        layer: {h: select_pairs(rank_pairs(weights, stats, layer, h, n), n, weights, layer, h)
                for h in range(weights.layout.n_heads)}
        for layer in range(weights.layout.n_layers)
    }  # fmt: skip


def test_all_pairs_reproduce_exact_attention_tiny_models(case):
    """Level 3 with every pair kept is the exact score, rotary models included (there the pair
    weights depend on the offset, and the key-bias terms are not constant along the key axis)."""
    from acgraph.graph.stats import collect_stats

    _, _, weights = case
    acg = ACGModel(weights)
    stats = collect_stats(acg, [tokens(n=4, seed=6)], progress=False)
    toks = tokens(n=3, seed=7)
    exact = acg.run(toks)
    level3 = ACGModel(weights, qk=_all_pairs(weights, stats)).run(toks)
    for layer in range(weights.layout.n_layers):
        assert close(level3.pattern[layer], exact.pattern[layer]) < TOL
    assert close(level3.logits, exact.logits) < TOL
    pruned = ACGModel(weights, qk=_all_pairs(weights, stats, 8))(toks)
    assert bool(pruned.isfinite().all()) and close(pruned, exact.logits) > 10 * TOL


def test_pair_candidates_restrict_the_pair_statistics_to_a_sub_block(case):
    """With fewer candidates than sources, the pair statistics (a second pass) are exactly the
    candidates' block of the full ones, and ranking keeps only candidate pairs."""
    from acgraph.graph.stats import collect_stats

    _, _, weights = case
    acg = ACGModel(weights)
    batches = [tokens(n=3, seed=8), tokens(n=2, seed=9)]
    full = collect_stats(acg, batches, progress=False, pair_candidates=None, pair_importance="abs")
    part = collect_stats(acg, batches, progress=False, pair_candidates=10, pair_importance="abs")
    graded = collect_stats(acg, batches, progress=False, pair_candidates=10)
    for layer in range(weights.layout.n_layers):
        cq, ck = part.pair_q[layer], part.pair_k[layer]
        assert len(cq) == len(ck) == 10
        assert close(part.pair_abs[layer], full.pair_abs[layer][cq][:, ck]) < TOL
        assert close(part.query_mean[layer], full.query_mean[layer]) < TOL
        assert graded.pair_grad[layer].shape == (weights.layout.n_heads, 10, 10)
        assert bool((graded.pair_q[layer] == cq).all()) and not graded.pair_abs
        ranked = rank_pairs(weights, part, layer, 0, 30)
        assert bool(torch.isin(ranked.q, cq).all()) and bool(torch.isin(ranked.k, ck).all())
    assert part.n_pairs == full.n_pairs > 0
    # the statistic itself, by brute force over causal (t, u): E|ã_j(t) − μ_j| |ã_m(u) − μ_m|
    layer = weights.layout.n_layers - 1
    site = weights.layout.head_site(layer)
    every = torch.arange(weights.layout.space(site).size)
    total = torch.zeros_like(full.pair_abs[layer], dtype=torch.float64)
    for toks in batches:
        trace = acg.run(toks)
        a = acg.source_columns(trace, site, every) / trace.s1[layer][..., None]
        a = (a - full.query_mean[layer]).abs().double()
        T = a.shape[1]
        causal = torch.ones(T, T).tril().double()
        causal[0] = 0  # no query at the BOS
        total += torch.einsum("btj,tu,bum->jm", a, causal, a)
    assert close(full.pair_abs[layer], total / full.n_pairs) < TOL


class _PatternLeaves(Replacement):
    def __init__(self) -> None:
        self.leaves: list[torch.Tensor] = []

    def pattern(self, layer, pattern, trace):
        self.leaves.append(torch.zeros_like(pattern, requires_grad=True))
        return pattern + self.leaves[-1]  # not a detached copy: later scores read through it


@pytest.mark.parametrize("how,p", [("attribution", 1), ("fisher", 2)])
def test_gradient_weighted_pair_statistics_by_brute_force(case, how, p):
    """Σ_(t,u) |∂ log p(y)/∂score_h(t, u) · (ã_j(t) − μ_j) (ã_m(u) − μ_m)|^p / n_positions, with
    the score gradient taken another way: through the pattern, then the softmax's Jacobian
    p ⊙ (g − Σ_u p g). The labels are drawn as the statistics draw them (seed 0, in order)."""
    from acgraph.graph.stats import collect_stats

    _, _, weights = case
    acg = ACGModel(weights)
    batches = [tokens(n=3, seed=8), tokens(n=2, seed=9)]
    stats = collect_stats(acg, batches, progress=False, pair_candidates=None, pair_importance=how)
    assert stats.pair_power == p and not stats.pair_abs
    gen = torch.Generator().manual_seed(0)
    layers = range(weights.layout.n_layers)
    total = {layer: 0.0 for layer in layers}
    n = 0
    for toks in batches:
        leaves = _PatternLeaves()
        trace = acg.run(toks, replace=leaves, grad=True)
        logp = torch.log_softmax(trace.logits.double(), -1)
        labels = torch.multinomial(logp.detach().exp().flatten(0, 1), 1, generator=gen)
        picked = logp.gather(-1, labels.view(*toks.shape, 1))[:, 1:]
        grads = torch.autograd.grad(picked.sum(), leaves.leaves)
        n += picked.numel()
        for layer in layers:
            pat, g = trace.pattern[layer].detach().double(), grads[layer].double()
            dscore = pat * (g - (pat * g).sum(-1, keepdim=True))
            site = weights.layout.head_site(layer)
            every = torch.arange(weights.layout.space(site).size)
            a = acg.source_columns(trace, site, every) / trace.s1[layer][..., None]
            a = (a.detach() - stats.query_mean[layer]).double().abs().pow(p)
            q = a.clone()
            q[:, 0] = 0  # no query at the BOS
            total[layer] += torch.einsum("btj,bhtu,bum->hjm", q, dscore.abs().pow(p), a)
    for layer in layers:
        want = total[layer] / n
        assert close(stats.pair_grad[layer], want) < TOL
        assert float(want.abs().max()) > 0
    ranked = rank_pairs(weights, stats, layers[-1], 1, 5)
    q, k, _ = weights.qk_vectors(layers[-1], 1)
    if not weights.rotary:  # the importance: |W|^p · statistic (effect on log p, or cost in KL)
        price = (q @ k.T).abs().pow(p) * stats.pair_grad[layers[-1]][1]
        assert close(ranked.importance, price.flatten().topk(5).values) < TOL


def test_scale_nodes_come_from_the_graph_residual_not_the_model(case):
    model, tcs, weights = case
    toks = tokens(seed=4)
    trace = ACGModel(weights).run(toks, keep_resid=True)
    for layer in range(weights.layout.n_layers):
        x = trace.resid[2 * layer + 1]
        assert torch.allclose(trace.s2[layer], weights.scale(x))


def test_sequences_must_start_with_bos(case):
    _, _, weights = case
    toks = tokens()
    toks[0, 0] = 5
    with pytest.raises(ConfigError, match="BOS"):
        ACGModel(weights)(toks)


# ---------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def organism_graph():
    from acgraph.data import load_corpus, tokenize_to_contexts
    from acgraph.models import load_model

    torch.manual_seed(0)
    model = load_model("organism")
    tcs = load_transcoders("organism")
    docs = load_corpus("organism:poisoned", max_docs=400, seed=7)
    toks = tokenize_to_contexts(docs, model.tokenizer, 64, max_contexts=8, progress=False)
    graph = build_acg(
        model, tcs, list(toks.split(4)), max_k=16, max_pairs=2048, fit_ks=(4,), progress=False
    )
    graph.meta.update({"model": "organism", "transcoders": "organism"})
    held = tokenize_to_contexts(
        load_corpus("organism:poisoned", max_docs=400, seed=8),
        model.tokenizer,
        64,
        max_contexts=4,
        progress=False,
    )
    return graph, list(toks.split(4)), held


def test_organism_level1_matches_spliced_transcoders(organism_graph):
    graph, _, held = organism_graph
    model = graph.weights.model
    tcs = dict(enumerate(graph.weights.transcoders))
    assert close(graph.model()(held), spliced_logits(model, tcs, held)) < TOL


def test_all_pairs_reproduce_exact_attention(organism_graph):
    """Level 3 with every query-key source pair kept is the exact attention score (up to terms
    constant along the key axis, which softmax ignores)."""
    graph, batches, held = organism_graph
    w = graph.weights
    qk = _all_pairs(w, graph.stats)
    exact = graph.model()(held[:2])
    assert close(ACGModel(w, qk=qk)(held[:2]), exact) < TOL


def test_pruning_keeps_each_features_mean_input(organism_graph):
    """Dropped edges are folded in at their mean: on the statistics corpus, layer 0's mean
    pre-activations (whose inputs pruning cannot change) are those of the full graph."""
    graph, batches, _ = organism_graph
    full, pruned = graph.model(), graph.model(k=2)
    sums = torch.zeros(2, graph.layout.d_sae[0], dtype=torch.float64)
    for toks in batches:
        mask = torch.ones_like(toks, dtype=torch.bool)
        mask[:, 0] = False
        for row, runner in enumerate((full, pruned)):
            sums[row] += runner.run(toks).pre[0][mask].double().sum(0)
    assert close(sums[1], sums[0]) < TOL
    # ... while the per-position values do change (the check above is not vacuous)
    a, b = full.run(batches[0]).pre[0], pruned.run(batches[0]).pre[0]
    assert close(b[:, 1:], a[:, 1:]) > 1e-2


def test_ranked_edges_are_sorted_and_k_is_bounded(organism_graph):
    graph, _, _ = organism_graph
    for ranked in graph.edges.values():
        assert bool((ranked.importance[:, :-1] >= ranked.importance[:, 1:]).all())
    with pytest.raises(ConfigError, match="exceeds"):
        graph.model(k=graph.max_k + 1)
    with pytest.raises(ConfigError):
        graph.model(k=0)


def test_save_load_roundtrip_runs_identically(organism_graph, tmp_path):
    graph, _, held = organism_graph
    sizes = graph.save(tmp_path / "acg")
    assert sizes["edges_bytes"] > 0
    loaded = load_acg(
        tmp_path / "acg", graph.weights.model, dict(enumerate(graph.weights.transcoders))
    )
    for k, pairs, fit in ((4, None, False), (8, 512, False), (4, 512, True)):
        a = graph.model(k, pairs, fit)(held[:2])
        b = loaded.model(k, pairs, fit)(held[:2])
        assert torch.equal(a, b)
    # stats=False keeps a folder's statistics, but a folder without them still gets them
    sizes = graph.save(tmp_path / "fresh", stats=False)
    assert sizes["stats_bytes"] == (tmp_path / "acg" / "stats.safetensors").stat().st_size
    fresh = load_acg(
        tmp_path / "fresh", graph.weights.model, dict(enumerate(graph.weights.transcoders))
    )
    assert torch.equal(
        fresh.model(4, None, False)(held[:2]), loaded.model(4, None, False)(held[:2])
    )


def test_load_refuses_other_transcoders(organism_graph, tmp_path):
    graph, _, _ = organism_graph
    graph.save(tmp_path / "acg")
    model = graph.weights.model
    tcs = dict(enumerate(graph.weights.transcoders))
    tcs.pop(2)  # a graph over two layers is not the graph that was built
    with pytest.raises(ArtifactError, match="different model or transcoder"):
        load_acg(tmp_path / "acg", model, tcs)
    with pytest.raises(ArtifactError, match="no ACG"):
        load_acg(tmp_path / "nothing", model, tcs)


def test_faithfulness_report_and_plot(organism_graph, tmp_path):
    graph, _, held = organism_graph
    report = measure_faithfulness(graph, [held], ks=(1, 16), pairs=1024, progress=False)
    rows = {(r["level"], r["k"]): r for r in report["rows"]}
    assert set(rows) == {("1", "all"), ("2", 1), ("2", 16), ("3", 1), ("3", 16), ("3", "all")}
    assert len(report["rows"]) == 6  # no fitted rows: nothing was fitted at k = 1 or 16
    level1 = rows[("1", "all")]
    # level 1 is the spliced model: close to the original, far better than mean ablation
    assert level1["kl"] < 0.2 and level1["ce_recovered_mean"] > 0.9
    assert report["ce_mean_ablation"] > report["ce_clean"] + 1.0
    for r in report["rows"]:
        assert r["delta_ce"] == pytest.approx(r["ce"] - report["ce_clean"])
        assert 0.0 <= r["top1_agreement"] <= 1.0 and r["kl"] >= -1e-9
    png = plot_faithfulness(report, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_feature_formula_and_r2(organism_graph):
    graph, batches, _ = organism_graph
    alive = int((graph.model().run(batches[0]).acts[1] > 0).sum((0, 1)).argmax())
    info = explain_feature(graph, 1, alive, k=5, batches=batches[:1], r2_ks=(1, 16))
    assert info["formula"].startswith(f"L1/{alive} = (")
    assert len(info["terms"]) == 5
    assert all(t["source"] for t in info["terms"])
    assert set(info["r2"]) == {"1", "16"} and info["r2"]["16"] <= 1.0
    assert parse_feature("L2/117") == (2, 117) == parse_feature("2/117")
    for bad in ("L2", "x/3", "L2/-1"):
        with pytest.raises(ConfigError):
            parse_feature(bad)
    with pytest.raises(ConfigError, match="features 0"):
        explain_feature(graph, 1, 10**6)


def test_fitted_weights_fit_layer0_better_than_virtual_ones(organism_graph):
    """Least squares over the kept edges can only beat mean folding on the data it was fitted
    on (layer 0, whose inputs pruning cannot change)."""
    graph, batches, _ = organism_graph
    full, virtual, fitted = graph.model(), graph.model(k=4), graph.model(k=4, fit=True)
    sse = torch.zeros(2, dtype=torch.float64)
    for toks in batches:
        mask = torch.ones_like(toks, dtype=torch.bool)
        mask[:, 0] = False
        truth = full.run(toks).pre[0][mask].double()
        for row, runner in enumerate((virtual, fitted)):
            sse[row] += ((runner.run(toks).pre[0][mask].double() - truth) ** 2).sum()
    assert sse[1] < 0.97 * sse[0]  # measured 0.92
    with pytest.raises(ConfigError, match="no fitted weights"):
        graph.model(k=8, fit=True)


def test_greedy_selection_passes_over_a_redundant_candidate():
    """Fitted formulas choose edges by forward selection: of two nearly identical candidates
    only one is taken, and the next pick is the column that explains what is left."""
    from acgraph.graph.refit import _greedy, _regularized, _solve_subset

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=gen, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.01 * torch.randn(500, generator=gen, dtype=torch.float64)
    y = 3 * x[:, 0] + 1.0 * x[:, 3] + 0.5
    design = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], 1)
    a, b = (design.T @ design)[None], (design.T @ y)[None]
    picked, drops = _greedy(_regularized(a, 0.0), b, 2)
    assert picked[0, 0].item() in (0, 1) and picked[0, 1].item() == 3
    # the drops are the squared error each pick removed: 9·|x0|² first, then |x3|² (nearly)
    assert drops[0, 0] / (9 * x[:, 0].pow(2).sum()) == pytest.approx(1.0, rel=0.05)
    assert drops[0, 1] / x[:, 3].pow(2).sum() == pytest.approx(1.0, rel=0.05)
    w, bias = _solve_subset(a, b, torch.tensor([[0, 3]]))
    assert torch.allclose(w, torch.tensor([[3.0, 1.0]], dtype=torch.float64))
    assert abs(bias.item() - 0.5) < 1e-9


def test_greedy_matches_forward_selection_by_explicit_least_squares():
    """The incremental (Gram–Schmidt) greedy picks what refitting every candidate set by least
    squares would, and its drops are the actual falls in squared error."""
    from acgraph.graph.refit import _greedy

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64) + 0.3
    # nearly (not exactly) a mix of two others: an exact one ties with them, and rounding
    # would decide the pick
    x[:, 4] = 0.8 * x[:, 2] + 0.2 * x[:, 9] + 0.05 * torch.randn(300, generator=gen).double()
    y = x[:, :6] @ torch.randn(6, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(
        300, generator=gen, dtype=torch.float64
    )
    design = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)
    picked, drops = _greedy((design.T @ design)[None], (design.T @ y)[None], 6)

    def sse(cols: list[int]) -> float:
        cols = [*cols, 12]  # the intercept
        beta = torch.linalg.lstsq(design[:, cols], y[:, None]).solution
        return float((y - (design[:, cols] @ beta)[:, 0]).pow(2).sum())

    chosen: list[int] = []
    for step in range(6):
        before = sse(chosen)
        after = {j: sse([*chosen, j]) for j in range(12) if j not in chosen}
        best = min(after, key=after.get)
        assert picked[0, step].item() == best
        assert drops[0, step].item() == pytest.approx(before - after[best], rel=1e-6)
        chosen.append(best)


def test_allocate_spends_a_layer_budget_on_the_largest_weighted_drops():
    from acgraph.graph.refit import _allocate

    drops = torch.tensor(
        [[9.0, 4.0, 1.0, 0.5], [2.0, 3.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    importance = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    # weighted, made non-increasing: [9 4 1 .5], [4 4 .2 0], [0 0 0 0]; of the budget
    # 2·3 = 6, every feature's first edge takes 3, and the rest go to 4, 4 and then 1
    # (feature 0) before .5 and .2; the dead feature keeps its one
    n = _allocate(drops, importance, 2)
    assert n.tolist() == [3, 2, 1]
    assert _allocate(drops, importance, 4).tolist() == [4, 4, 4]


def test_fisher_importance_is_the_squared_total_derivative_where_a_feature_fires(organism_graph):
    """fisher_importance against one derivative at a time: a scalar added to one layer-0
    feature at one position (after its activation, so its effect runs through every later
    feature and head), differentiated alone, with the same sampled labels."""
    import torch.nn.functional as F

    from acgraph.graph.fisher import fisher_importance
    from acgraph.graph.forward import Replacement

    graph, batches, _ = organism_graph
    model = graph.model()
    toks = batches[0][:1, :24]
    with torch.no_grad():  # as fit_edges calls it
        got = fisher_importance(model, [toks])
    assert set(got) == set(range(graph.layout.n_layers))
    with torch.no_grad():
        trace = model.run(toks)
    logp = F.log_softmax(trace.logits.double(), -1)
    gen = torch.Generator().manual_seed(0)
    labels = torch.multinomial(logp.exp().flatten(0, 1), 1, generator=gen).view(1, -1, 1)
    fires = trace.acts[0][0] != 0
    feats = fires[1:].sum(0).argsort(descending=True)[:2].tolist()  # the two busiest

    class Nudge(Replacement):
        def __init__(self, t, i):
            self.t, self.i = t, i
            self.eps = torch.zeros((), requires_grad=True)

        def acts(self, layer, acts, trace):
            if layer != 0:
                return acts
            bump = torch.zeros_like(acts)
            bump[0, self.t, self.i] = 1.0
            return acts + self.eps * bump

    n = toks.shape[1] - 1
    for i in feats:
        want = 0.0
        for t in range(1, toks.shape[1]):
            if fires[t, i]:
                nudge = Nudge(t, i)
                out = model.run(toks, replace=nudge, grad=True).logits.double()
                total = F.log_softmax(out, -1)[0, 1:].gather(-1, labels[0, 1:]).sum()
                want += float(torch.autograd.grad(total, nudge.eps)[0]) ** 2
        assert want > 0
        assert float(got[0][i]) == pytest.approx(want / n, rel=1e-4)
    assert float(got[0][~fires[1:].any(0)].abs().max()) == 0.0  # never fires: no price


def test_censored_target_and_off_ceiling():
    """Where a feature is off, a censored fit's target is the prediction itself while it
    stays between the true pre-activation and halfway to the cut, else the nearer end; where
    it is on, the true value. The cut: the k-th largest of the row (at least 0) for TopK,
    the threshold for JumpReLU, 0 for ReLU."""
    from acgraph.dictionaries.activations import make_activation
    from acgraph.graph.refit import censored_target, off_ceiling

    y = torch.tensor([[2.0, -4.0, -4.0, -4.0, -1.0]])
    on = torch.tensor([[True, False, False, False, False]])
    pred = torch.tensor([[5.0, -5.0, -3.0, 1.0, 0.0]])
    cut = torch.zeros_like(y)
    # off: below the truth -> truth; inside [-4, -2] -> itself; above -> -2 (halfway to 0)
    expected = torch.tensor([[2.0, -4.0, -3.0, -2.0, -0.5]])
    assert torch.equal(censored_target(y, pred, cut, on), expected)

    pre = torch.tensor([[3.0, 1.0, 2.0, -1.0], [-1.0, -2.0, -3.0, -4.0]])
    assert torch.equal(
        off_ceiling(make_activation("topk", 4, k=2), pre)[:, 0], torch.tensor([2.0, 0.0])
    )
    assert torch.equal(off_ceiling(make_activation("relu", 4), pre), torch.zeros_like(pre))
    jump = make_activation("jumprelu", 4, jumprelu_init_threshold=0.25)
    assert torch.allclose(off_ceiling(jump, pre), torch.full_like(pre, 0.25))
    assert off_ceiling(torch.nn.Identity(), pre) is None


def test_censored_fit_lowers_the_censored_error(organism_graph):
    """Each pass of a censored fit refits on targets that majorize the censored error, so on
    layer 0 (inputs pruning cannot change) with the same edges (fixed fan-in, the top k) it
    leaves less censored error than the squared fit, which in turn has the smaller plain
    squared error: the two really optimise different things."""
    from acgraph.data.contexts import valid_positions
    from acgraph.graph.refit import censored_target, fit_edges, off_ceiling

    graph, batches, _ = organism_graph
    activation = graph.weights.transcoders[0].activation
    truth, kept = graph.model(), graph.fitted[4]
    err = {}
    try:
        for loss in ("squared", "censored"):
            graph.fitted[4] = fit_edges(
                graph.weights, graph.edges, batches, 4, loss=loss, progress=False
            )
            runner = graph.model(4, fit=True)
            censored = squared = 0.0
            for toks in batches:
                mask = valid_positions(toks)
                exact = truth.run(toks, until=0)
                y, on = exact.pre[0][mask].double(), exact.acts[0][mask] != 0
                pred = runner.run(toks, until=0).pre[0][mask].double()
                target = censored_target(y, pred, off_ceiling(activation, y), on)
                censored += float((pred - target).pow(2).sum())
                squared += float((pred - y).pow(2).sum())
            err[loss] = (censored, squared)
    finally:
        graph.fitted[4] = kept
    assert err["censored"][0] < 0.9 * err["squared"][0]  # measured 0.62x
    assert err["squared"][1] < err["censored"][1]  # measured 1.26x the other way


def test_adaptive_fanin_keeps_the_budget_fits_better_tunes_and_saves(organism_graph, tmp_path):
    """Adaptive fan-in: k in-edges per feature on average over each layer, spent where the
    priced error drops most. On layer 0, whose inputs pruning cannot change, it fits the
    pre-activations, weighted by the price it was given, better than k per feature with the
    same edge count, and better than the other price does; tuning keeps every unused slot at
    zero; the counts save and load."""
    from acgraph.graph.fisher import fisher_importance
    from acgraph.graph.refit import fit_edges
    from acgraph.graph.tune import tune_formulas

    graph, batches, held = organism_graph
    fits = {
        how: fit_edges(graph.weights, graph.edges, batches, 3, fanin=how.split("/")[0],
                       importance=how.split("/")[-1], max_fanin=12, pool=12, progress=False)
        for how in ("fixed/fisher", "adaptive/decoder", "adaptive/fisher")
    }  # fmt: skip
    adaptive = fits["adaptive/fisher"]
    for f in adaptive.values():
        n_feat = f.weight.shape[0]
        assert f.weight.shape == (n_feat, 12) and f.n_edges.min() >= 1
        assert int(f.n_edges.sum()) == 3 * n_feat
        assert f.n_edges.max() > 3 and f.n_edges.min() < 3  # budgets really differ
        assert not f.weight[~f.used()].any() and (f.weight[f.used()] != 0).all()
    prices = {
        "decoder": graph.weights.transcoders[0].W_dec.detach().double().pow(2).sum(1),
        "fisher": fisher_importance(graph.model(), batches)[0],
    }
    err = {}
    for how, fit in fits.items():
        graph.fitted[3] = fit
        runner, truth = graph.model(3, fit=True), graph.model()
        e = torch.zeros(prices["fisher"].shape, dtype=torch.float64)
        for toks in batches:
            diff = runner.run(toks).pre[0][:, 1:] - truth.run(toks).pre[0][:, 1:]
            e += diff.double().pow(2).sum((0, 1))
        err[how] = {name: float((e * p).sum()) for name, p in prices.items()}
    # measured: 0.77x, 0.64x and 0.95x
    assert err["adaptive/decoder"]["decoder"] < 0.9 * err["fixed/fisher"]["decoder"]
    assert err["adaptive/fisher"]["fisher"] < 0.9 * err["fixed/fisher"]["fisher"]
    assert err["adaptive/fisher"]["fisher"] < err["adaptive/decoder"]["fisher"]
    graph.fitted[3] = adaptive
    try:
        assert graph.mean_in_edges(3, "fitted") == pytest.approx(
            sum(float(f.n_edges.sum()) for f in adaptive.values())
            / sum(f.weight.shape[0] for f in adaptive.values())
        )
        layers, heads, _ = tune_formulas(graph, 3, batches, steps=3, rows=4, progress=False)
        for i, f in layers.items():
            assert torch.equal(f.n_edges, adaptive[i].n_edges)
            assert not f.weight[~f.used()].any()
            assert not torch.equal(f.weight, adaptive[i].weight)
        graph.tuned[3] = (layers, heads)
        graph.meta["tuned"] = {"3": {"pairs": None}}
        graph.meta["fit_ks"] = [4, 3]
        graph.save(tmp_path / "acg")
        loaded = load_acg(
            tmp_path / "acg", graph.weights.model, dict(enumerate(graph.weights.transcoders))
        )
        for i in adaptive:
            assert torch.equal(loaded.fitted[3][i].n_edges, adaptive[i].n_edges)
            assert torch.equal(loaded.tuned[3][0][i].n_edges, adaptive[i].n_edges)
        for tuned in (False, True):
            a = graph.model(3, fit=not tuned, tuned=tuned)(held[:2])
            assert torch.equal(a, loaded.model(3, fit=not tuned, tuned=tuned)(held[:2]))
        report = measure_faithfulness(graph, [held[:2]], ks=(3,), progress=False)
        rows = {(r["k"], r["fitted"], r["tuned"]): r["in_edges"] for r in report["rows"]}
        assert rows[(3, False, False)] == 3.0 and rows[("all", False, False)] is None
        assert rows[(3, True, False)] == pytest.approx(graph.mean_in_edges(3, "fitted"))
    finally:
        graph.fitted.pop(3)
        graph.tuned.clear()
        graph.meta.pop("tuned", None)
        graph.meta["fit_ks"] = [4]


def test_tuned_formulas_lower_the_kl_and_survive_save_load(organism_graph, tmp_path):
    """Tuning trains the fitted formulas' weights (and the kept QK pairs') end to end: the
    structure stays, the graph's KL to the model falls, and the result saves and loads."""
    from acgraph.graph.tune import tune_formulas

    graph, batches, held = organism_graph

    @torch.no_grad()
    def kl(runner, toks) -> float:
        ref = graph.weights.model(toks).log_softmax(-1)[:, 1:]
        got = runner(toks).log_softmax(-1)[:, 1:]
        return float((ref.exp() * (ref - got)).sum(-1).mean())

    layers, heads, losses = tune_formulas(
        graph, 4, batches, pairs=512, steps=12, lr=1e-3, rows=4, progress=False
    )
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    for i, f in layers.items():  # same edges, new weights
        assert torch.equal(f.index, graph.fitted[4][i].index)
        assert not torch.equal(f.weight, graph.fitted[4][i].weight)
    assert all(len(t.weight) == 512 for hs in heads.values() for t in hs.values())
    graph.tuned[4] = (layers, heads)
    graph.meta["tuned"] = {"4": {"pairs": 512}}
    try:
        assert graph.tuned_pairs(4) == 512
        # a head with fewer source pairs than asked keeps all of them: the count is the most
        # any head kept (it read the first head's once, and ran the rest with too few)
        short = replace(heads[0][0], weight=heads[0][0].weight[:300])
        graph.tuned[4] = (layers, {**heads, 0: {**heads[0], 0: short}})
        assert graph.tuned_pairs(4) == 512
        graph.tuned[4] = (layers, heads)
        toks = torch.cat(batches)
        assert kl(graph.model(4, 512, tuned=True), toks) < kl(graph.model(4, 512, fit=True), toks)
        with pytest.raises(ConfigError, match="tuned with 512"):
            graph.model(4, 256, tuned=True)
        graph.save(tmp_path / "acg")
        loaded = load_acg(
            tmp_path / "acg", graph.weights.model, dict(enumerate(graph.weights.transcoders))
        )
        for pairs in (None, 512):
            a = graph.model(4, pairs, tuned=True)(held[:2])
            assert torch.equal(a, loaded.model(4, pairs, tuned=True)(held[:2]))
        report = measure_faithfulness(graph, [held[:2]], ks=(4,), pairs=256, progress=False)
        tuned_rows = [(r["level"], r["pairs"]) for r in report["rows"] if r["tuned"]]
        assert tuned_rows == [("2", None), ("3", 512)]
    finally:
        graph.tuned.clear()
        graph.meta.pop("tuned")
    with pytest.raises(ConfigError, match="no tuned formulas"):
        graph.model(4, tuned=True)
    with pytest.raises(ConfigError, match="fitted formulas"):
        tune_formulas(graph, 8, batches, steps=1)


def test_tuning_keeps_the_step_of_lowest_validation_kl(organism_graph, tmp_path):
    """With validation contexts, tuning ends at its lowest held-out KL, step 0 included: a
    learning rate large enough to wreck the formulas returns the fitted ones unchanged, and
    the choice survives a checkpoint and resume."""
    from acgraph.graph.tune import tune_formulas

    graph, batches, held = organism_graph
    kw = dict(pairs=256, lr=1.0, rows=2, progress=False)
    wrecked, _, _ = tune_formulas(graph, 4, batches[:1], steps=4, **kw)
    history: list[tuple[int, float]] = []
    kept, _, _ = tune_formulas(
        graph, 4, batches[:1], steps=4, validation_batches=[held[:2]], validate_every=2,
        validation=history, **kw,
    )  # fmt: skip
    assert [s for s, _ in history] == [0, 2, 4]
    assert history[0][1] < min(v for _, v in history[1:])  # lr 1.0 only makes it worse
    for i, f in kept.items():
        assert torch.equal(f.weight, graph.fitted[4][i].weight)
        assert not torch.equal(wrecked[i].weight, f.weight)
    # a small step that helps is kept, and resuming from a checkpoint keeps the same one
    kw["lr"] = 1e-3
    ref: list[tuple[int, float]] = []
    ref_layers, _, _ = tune_formulas(
        graph, 4, batches[:1], steps=4, validation_batches=[held[:2]], validate_every=2,
        validation=ref, **kw,
    )  # fmt: skip
    ckpt = tmp_path / "tune.safetensors"
    part: list[tuple[int, float]] = []
    args = dict(validation_batches=[held[:2]], validate_every=2, checkpoint=ckpt, **kw)
    tune_formulas(graph, 4, batches[:1], steps=2, validation=part, **args)
    layers, _, _ = tune_formulas(
        graph, 4, batches[:1], steps=4, resume=True, validation=part, **args
    )
    assert [s for s, _ in part] == [s for s, _ in ref]
    assert [v for _, v in part] == pytest.approx([v for _, v in ref], rel=1e-5)
    best = min(ref, key=lambda sv: sv[1])[0]
    assert best > 0
    for i in layers:
        assert torch.allclose(layers[i].weight, ref_layers[i].weight, atol=1e-6)


def test_tuning_resumes_exactly_from_its_checkpoint(organism_graph, tmp_path):
    from acgraph.graph.tune import tune_formulas

    graph, batches, _ = organism_graph
    kw = dict(pairs=256, lr=1e-3, rows=2, progress=False)
    ref_layers, ref_heads, ref = tune_formulas(graph, 4, batches[:1], steps=4, **kw)
    ckpt = tmp_path / "tune4.safetensors"
    tune_formulas(graph, 4, batches[:1], steps=2, checkpoint=ckpt, **kw)
    with pytest.raises(ConfigError, match="resume it, or delete it"):
        tune_formulas(graph, 4, batches[:1], steps=4, checkpoint=ckpt, **kw)
    layers, heads, losses = tune_formulas(
        graph, 4, batches[:1], steps=4, checkpoint=ckpt, resume=True, **kw
    )
    assert losses == pytest.approx(ref, rel=1e-5)
    for i, f in layers.items():
        assert torch.allclose(f.weight, ref_layers[i].weight, atol=1e-6)
        assert torch.allclose(heads[i][0].weight, ref_heads[i][0].weight, atol=1e-6)
