"""Hypotheses as code: the Context, loading, swapping (ACG and real model), local fidelity,
built-in families, and the coverage report, on the shipped organism."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from acgraph.errors import ConfigError
from acgraph.hypotheses import (
    Context,
    Hypothesis,
    Subject,
    Target,
    evaluate_hypotheses,
    load_file,
    load_hypotheses,
)
from acgraph.hypotheses.coverage import coverage, format_coverage, importance
from acgraph.hypotheses.evaluate import local_fidelity, swap_costs
from acgraph.hypotheses.families import fit_all
from acgraph.hypotheses.render import render
from acgraph.hypotheses.swap import run_acg, run_model, true_value

VOCAB = {"<bos>": 0, "a": 1, "b": 2, "c": 3}


HEAD_1_0 = Target("pattern", 1, 0)


def _ctx(tokens, target=HEAD_1_0, acts=(), patterns=()):
    view = SimpleNamespace(tokens=torch.tensor(tokens), acts=list(acts), pattern=list(patterns))
    return Context(view, VOCAB, target)


# ---------------------------------------------------------------- Context


def test_pattern_builders_are_exact():
    ctx = _ctx([[0, 1, 2, 1, 2]])  # <bos> a b a b
    prev = ctx.previous_token()[0]
    assert torch.equal(prev[0], torch.tensor([1.0, 0, 0, 0, 0]))  # nothing before BOS: BOS
    assert torch.equal(prev[3], torch.tensor([0, 0, 1.0, 0, 0]))
    same = ctx.same_token()[0]
    assert torch.equal(same[3], torch.tensor([0, 1.0, 0, 0, 0]))  # the earlier 'a'
    assert torch.equal(same[2], torch.tensor([1.0, 0, 0, 0, 0]))  # first 'b': BOS
    ind = ctx.induction()[0]
    assert torch.equal(ind[3], torch.tensor([0, 0, 1.0, 0, 0]))  # what followed the earlier 'a'
    assert torch.equal(ind[4], torch.tensor([0, 0, 0, 1.0, 0]))  # what followed the earlier 'b'
    assert torch.allclose(ctx.mix((1, ctx.bos()), (3, ctx.offset(1)))[0, 4, [0, 3]],
                          torch.tensor([0.25, 0.75]))  # fmt: skip
    for p in (prev, same, ind, ctx.offset(3)[0]):
        assert torch.allclose(p.sum(-1), torch.ones(5)) and torch.equal(p, p.tril())


def test_token_tables_and_shifts():
    ctx = _ctx([[0, 1, 2, 3, 1]])
    assert ctx.is_token("a", "c").tolist() == [[0, 1, 0, 1, 1]]
    assert ctx.is_token("a", shift=1).tolist() == [[0, 0, 1, 0, 0]]
    assert ctx.token_values({"b": 2.0, "a": -1.0}).tolist() == [[0, -1, 2, 0, -1]]
    assert ctx.ngram_values({("a", "b"): 5.0, ("c", "a"): 7.0}).tolist() == [[0, 0, 5, 0, 7]]
    assert ctx.position_values({1: 1.0, 4: 3.0}).tolist() == [[0, 1, 0, 0, 3]]
    with pytest.raises(ConfigError, match="unknown token 'zzz'"):
        ctx.is_token("zzz")


def test_context_refuses_nodes_that_are_not_upstream():
    acts = [torch.zeros(1, 3, 4), torch.ones(1, 3, 4)]
    pats = [torch.eye(3).expand(1, 2, 3, 3)] * 2
    feat = _ctx([[0, 1, 2]], Target("feature", 1, 0), acts, pats)
    assert feat.feature(0, 2).shape == (1, 3) and feat.pattern(1, 0).shape == (1, 3, 3)
    with pytest.raises(ConfigError, match="reads feature L1/0, which is not upstream"):
        feat.feature(1, 0)
    head = _ctx([[0, 1, 2]], Target("pattern", 1, 0), acts, pats)
    with pytest.raises(ConfigError, match="reads head L1.H1, which is not upstream"):
        head.pattern(1, 1)
    # values are copies: a hypothesis cannot write into the run
    feat.feature(0, 1).fill_(9)
    assert float(acts[0].abs().sum()) == 0


# ---------------------------------------------------------------- loading


def test_load_file_collects_decorated_functions_and_zero_calls(tmp_path):
    f = tmp_path / "h.py"
    f.write_text(
        "from acgraph.hypotheses import feature, head, zero\n"
        "@feature(1, 3)\ndef three(ctx):\n    return ctx.is_token('a')\n"
        "@head(0, 2, family='previous_token')\ndef prev(ctx):\n    return ctx.previous_token()\n"
        "zero(2, [5, 6])\n"
    )
    hyps = load_file(f)
    assert [str(h.target) for h in hyps] == ["L1/3", "L0.H2", "L2/5", "L2/6"]
    assert hyps[1].family == "previous_token" and all(h.source == str(f) for h in hyps)
    later = tmp_path / "later.py"
    later.write_text(
        "from acgraph.hypotheses import feature\n"
        "@feature(1, 3, name='better')\ndef f(ctx):\n    return ctx.zeros()\n"
    )
    merged = load_hypotheses([f, later])
    assert merged[Target("feature", 1, 3)].name == "better" and len(merged) == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("def f(:\n", "h.py:1: SyntaxError"),
        ("x = 1\n", "defines no hypotheses"),
        ("import nonexistent_module_xyz\n", "h.py:1: ModuleNotFoundError"),
        ("from acgraph.hypotheses import feature\n@feature(-1, 0)\ndef f(c):\n    return 0\n",
         "invalid hypothesis target"),
    ],
)  # fmt: skip
def test_bad_hypothesis_files_are_one_line_errors(tmp_path, text, message):
    f = tmp_path / "h.py"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_file(f)
    assert "\n" not in str(err.value)


def test_only_python_files_that_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such hypothesis file"):
        load_file(tmp_path / "missing.py")
    (tmp_path / "h.txt").write_text("")
    with pytest.raises(ConfigError, match=r"Python \(.py\)"):
        load_file(tmp_path / "h.txt")


# ---------------------------------------------------------------- the organism


@pytest.fixture(scope="module")
def subject():
    from acgraph.graph import load_transcoders
    from acgraph.models import load_model
    from acgraph.organism import load_config

    return Subject.build(load_model("organism"), load_transcoders("organism"), load_config())


@pytest.fixture(scope="module")
def batches(subject):
    from acgraph.cli.graph import _batches

    return _batches(subject.model, "organism:trusted", 8, 64, 1, 4)


def _oracle(target, truth_by_batch, engine="model"):
    """A hypothesis that returns the target's true values (looked up by the batch's tokens)."""

    def fn(ctx):
        return truth_by_batch[ctx.tokens.numpy().tobytes()]

    return Hypothesis(target, fn, f"oracle_{target}", "oracle")


def _truth(subject, batches, targets, engine):
    out = {t: {} for t in targets}
    for tokens in batches:
        if engine == "model":
            view = run_model(subject.model, subject.transcoders, tokens)
        else:
            view = run_acg(subject.acg, tokens, None)
        for t in targets:
            value = true_value(t, view) if engine == "model" else _acg_value(t, view)
            out[t][tokens.numpy().tobytes()] = value.clone()
    return out


def _acg_value(t, trace):
    return (
        trace.acts[t.layer][..., t.index]
        if t.kind == "feature"
        else trace.pattern[t.layer][:, t.index]
    )


def test_true_values_have_perfect_local_fidelity_and_cost_nothing(subject, batches):
    targets = [Target("feature", 1, i) for i in range(4)] + [Target("pattern", 1, 2)]
    truth = _truth(subject, batches, targets, "model")
    hyps = {t: _oracle(t, truth[t]) for t in targets}
    local = local_fidelity(subject, hyps, batches, progress=False)
    for t in targets:
        assert local[t]["fvu"] == pytest.approx(0, abs=1e-9)
        if t.kind == "pattern":
            assert (
                local[t]["mass_overlap"] == pytest.approx(1) and local[t]["argmax_agreement"] == 1
            )
        elif local[t]["firing_rate"] > 0:
            assert local[t]["precision"] == 1 and local[t]["recall"] == 1
            assert local[t]["corr"] == pytest.approx(1)
    cost = swap_costs(subject, hyps, batches, engines=("model",), progress=False)
    assert abs(cost["model_vs_original"]["delta_ce"]) < 1e-5
    assert cost["model_vs_original"]["kl"] < 1e-6 and cost["model_vs_original"]["top1"] == 1


def test_acg_swap_of_its_own_values_is_exact_and_zeroing_equals_removing_the_decoder_row(
    subject, batches
):
    targets = [Target("feature", 0, i) for i in range(16)] + [Target("pattern", 0, 1)]
    truth = _truth(subject, batches, targets, "acg")
    hyps = {t: _oracle(t, truth[t]) for t in targets}
    sw = subject.swapped(hyps)
    tokens = batches[0]
    base = subject.acg(tokens)
    assert torch.allclose(run_acg(subject.acg, tokens, sw).logits, base, atol=1e-5)
    # "feature 5 of layer 0 is always 0" == the same graph without that feature's decoder row
    zero = {Target("feature", 0, 5): Hypothesis(Target("feature", 0, 5), lambda c: c.zeros(), "z")}
    swapped = run_acg(subject.acg, tokens, subject.swapped(zero)).logits
    tc = subject.transcoders[0]
    saved = tc.W_dec.data[5].clone()
    try:
        tc.W_dec.data[5] = 0
        ablated = subject.acg(tokens)
    finally:
        tc.W_dec.data[5] = saved
    assert torch.allclose(swapped, ablated, atol=1e-5)
    assert not torch.allclose(swapped, base, atol=1e-3)  # the feature mattered


def test_swapping_a_whole_layer_drops_the_transcoder_error(subject, batches):
    """Every layer-0 feature swapped for its true value: the real model with layer 0's MLP
    replaced by its transcoder (the error term is not part of any hypothesis)."""
    targets = [Target("feature", 0, i) for i in range(subject.transcoders[0].d_sae)]
    truth = _truth(subject, batches[:1], targets, "model")
    hyps = {t: _oracle(t, truth[t]) for t in targets}
    tokens = batches[0]
    swapped = run_model(subject.model, subject.transcoders, tokens, subject.swapped(hyps)).logits
    tc = subject.transcoders[0]
    cache = {}

    def keep_in(v, hook):
        cache["in"] = v

    def splice(v, hook):
        acts = tc.encode(cache["in"])
        acts[:, 0] = 0
        return tc.decode(acts, cache["in"])

    with torch.no_grad():
        spliced = subject.model.run_with_hooks(
            tokens,
            fwd_hooks=[
                ("blocks.0.ln2.hook_normalized", keep_in),
                ("blocks.0.hook_mlp_out", splice),
            ],
        )
    assert torch.allclose(swapped, spliced, atol=1e-5)


def test_hypothesis_errors_at_run_time_name_the_hypothesis(subject, batches):
    def broken(ctx):
        return ctx.feature(0, 1) / ctx.tokens[:, :2]  # wrong shape -> RuntimeError

    h = Hypothesis(Target("feature", 1, 0), broken, "broken", source="mine.py")
    with pytest.raises(ConfigError, match=r"hypothesis broken \(L1/0, mine.py\) failed"):
        local_fidelity(subject, {h.target: h}, batches[:1], progress=False)
    bad_shape = Hypothesis(Target("pattern", 0, 0), lambda c: c.zeros(), "flat")
    with pytest.raises(ConfigError, match=r"returned shape \(4, 64\), expected \(4, 64, 64\)"):
        local_fidelity(subject, {bad_shape.target: bad_shape}, batches[:1], progress=False)


@pytest.fixture(scope="module")
def fitted(subject, tmp_path_factory):
    from acgraph.cli.graph import _batches

    fit_batches = _batches(subject.model, "organism:trusted", 16, 128, 0, 8)
    found = fit_all(subject, fit_batches, progress=False)
    path = tmp_path_factory.mktemp("hyp") / "fitted.py"
    path.write_text(render(found, subject.vocab, "fitted in a test"))
    return found, path, fit_batches


def test_fitting_covers_every_node_with_readable_code(subject, fitted):
    found, path, _ = fitted
    n_feats = sum(tc.d_sae for tc in subject.transcoders.values())
    assert len(found) == n_feats + 3 * subject.model.cfg.n_heads
    hyps = load_hypotheses([path])
    assert set(hyps) == {f.target for f in found}
    families = {f.family for f in found}
    assert {"token", "ngram", "linear", "dead"} <= families
    text = path.read_text()
    assert "ctx.token_values({" in text and "ctx.jump(pre," in text and "zero(0, [" in text


def test_rendered_code_reproduces_the_fitted_validation_score(subject, fitted):
    """The Python written out is the hypothesis that was scored: recomputing FVU from the
    loaded file on the same validation contexts gives the recorded val_fvu."""
    found, path, fit_batches = fitted
    hyps = load_hypotheses([path])
    val = fit_batches[-1][4:]  # the last quarter of the 16 contexts: the validation split
    chosen = [f for f in found if f.family in ("token", "ngram", "linear", "position")][:40:4]
    chosen += [f for f in found if f.target.kind == "pattern"][:2]
    picked = {f.target: hyps[f.target] for f in chosen}
    local = local_fidelity(subject, picked, [val], progress=False)
    for f in chosen:
        if f.target.kind == "pattern":
            assert 1 - local[f.target]["mass_overlap"] == pytest.approx(f.fvu, abs=2e-3)
        else:
            assert local[f.target]["fvu"] == pytest.approx(f.fvu, rel=2e-2, abs=2e-3)


def test_a_token_feature_is_found_by_the_token_family(subject, fitted):
    """Layer-0 features that fire on a handful of tokens: the token or n-gram family explains
    most of them on held-out text."""
    found, _, _ = fitted
    layer0 = [f for f in found if f.target.layer == 0 and f.target.kind == "feature"]
    good = [f for f in layer0 if f.family in ("token", "ngram") and f.fvu < 0.1]
    assert len(good) >= 30  # of 384, from 12 fitting contexts
    assert all(f.alternatives["position"] > 0.5 for f in good)  # position alone cannot do it


def test_evaluate_reports_local_swap_and_organism_scores(subject, fitted, batches):
    _, path, _ = fitted
    hyps = load_hypotheses([path])
    some = {t: h for t, h in hyps.items() if t.layer == 2 and t.kind == "feature"}
    some = dict(list(some.items())[:3])
    report = evaluate_hypotheses(subject, some, batches[:1], n_per_domain=4, progress=False)
    assert report["n_hypotheses"] == 3 and len(report["hypotheses"]) == 3
    row = report["hypotheses"][0]
    assert {"fvu", "corr", "precision", "recall"} <= set(row["local"])
    assert {"acg_vs_acg", "acg_vs_original"} == set(row["swap"])
    t = report["together"]
    assert {"acg_vs_acg", "acg_vs_original", "model_vs_original", "organism"} <= set(t)
    assert set(t["organism"]) == {"original", "acg", "acg_swapped", "model_swapped"}
    assert report["accepted"] == (
        all(r["verdict"]["accepted"] for r in report["hypotheses"])
        and t["acg_vs_acg"]["delta_ce"] <= report["thresholds"]["max_delta_ce"]
    )


def test_importance_is_zero_for_features_that_never_fire(subject, batches):
    feats, heads = importance(subject, batches[:1], progress=False)
    view = run_acg(subject.acg, batches[0], None)
    for layer, imp in enumerate(feats):
        silent = (view.acts[layer][:, 1:] == 0).all(0).all(0)
        assert bool((imp[silent] == 0).all()) and float(imp.sum()) > 0
    assert all(h.shape == (subject.model.cfg.n_heads,) and float(h.sum()) > 0 for h in heads)


def test_coverage_understood_depends_on_the_budget_and_completeness(subject, fitted, batches):
    _, path, _ = fitted
    hyps = load_hypotheses([path])
    strict = coverage(subject, hyps, batches[:1], budget=0.0, progress=False)
    assert strict["understood_up_to_layer"] == -1 and "> budget 0.0" in strict["blocked_by"]
    loose = coverage(subject, hyps, batches[:1], budget=100.0, progress=False)
    assert loose["understood_up_to_layer"] == 2 and loose["blocked_by"] is None
    row = loose["layers"][0]
    assert row["features_with_hypothesis"] == row["features"] and row["complete"]
    assert 0 < row["importance_share_accepted"] <= 1
    no_heads = {t: h for t, h in hyps.items() if not (t.kind == "pattern" and t.layer == 1)}
    partial = coverage(subject, no_heads, batches[:1], budget=100.0, progress=False)
    assert partial["understood_up_to_layer"] == 0
    assert partial["blocked_by"] == "layer 1: 0 features and 4 heads have no hypothesis"
    md = format_coverage(partial)
    assert "**Understood up to layer 0**" in md and "| 1 | 384" in md


def test_component_hypotheses_replace_whole_outputs(subject, batches):
    """`@component` targets: the true MLP / attention outputs swapped back in change nothing
    (real model and ACG), and a zero MLP output equals ablating that MLP."""
    mlp, attn = Target("mlp", 1), Target("attn", 0)
    truth = _truth(subject, batches[:1], [mlp, attn], "model")
    hyps = {t: _oracle(t, truth[t]) for t in (mlp, attn)}
    local = local_fidelity(subject, hyps, batches[:1], progress=False)
    assert local[mlp]["fvu"] == pytest.approx(0, abs=1e-9) and local[attn]["mse"] < 1e-12
    tokens = batches[0]
    orig = subject.model(tokens)
    swapped = run_model(subject.model, subject.transcoders, tokens, subject.swapped(hyps)).logits
    assert torch.allclose(swapped, orig, atol=1e-5)

    # in the ACG: its own layer-1 MLP output, recomputed from its trace, changes nothing
    trace = run_acg(subject.acg, tokens, None)
    tc = subject.transcoders[1]
    own = trace.acts[1] @ tc.W_dec + tc.b_dec + trace.skip[1]
    h = Hypothesis(mlp, lambda ctx: own, "own_mlp")
    again = run_acg(subject.acg, tokens, subject.swapped({mlp: h})).logits
    assert torch.allclose(again, trace.logits, atol=1e-5)
    zero = Hypothesis(mlp, lambda ctx: torch.zeros_like(own), "no_mlp")
    ablated = run_model(subject.model, subject.transcoders, tokens, subject.swapped({mlp: zero}))

    def kill(v, hook):
        return torch.zeros_like(v)

    with torch.no_grad():
        expect = subject.model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", kill)])
    assert torch.allclose(ablated.logits, expect, atol=1e-5)
