"""`acg clean`: keep only what trusted data uses; the method never sees a trigger or payload."""

from __future__ import annotations

import inspect

import pytest
import torch

from acgraph.cli import main
from acgraph.errors import ConfigError
from acgraph.graph import ACGModel, ModelWeights, load_transcoders
from acgraph.safety import clean as clean_module
from acgraph.safety.clean import (
    CleanConfig,
    clean,
    feature_usage,
    input_subspaces,
    save_cleaned,
)
from acgraph.safety.compile import compile_acg, hf_logits

torch.set_num_threads(1)
UNTRUSTED = ("trigger", "payload", "poison", "backdoor", "attack")


@pytest.fixture(scope="module")
def organism(trusted_organism):
    return trusted_organism


def test_the_method_has_no_way_to_receive_a_trigger_or_payload():
    """Every public function of the clean module takes model, dictionaries, trusted tokens and
    thresholds: no parameter (nor config field) through which backdoor knowledge could enter."""
    for name, fn in inspect.getmembers(clean_module, inspect.isfunction):
        if fn.__module__ != clean_module.__name__:
            continue
        for param in inspect.signature(fn).parameters:
            assert not any(w in param.lower() for w in UNTRUSTED), (name, param)
    fields = CleanConfig.__dataclass_fields__
    assert not any(w in f for f in fields for w in UNTRUSTED)
    assert list(inspect.signature(clean).parameters) == [
        "model",
        "transcoders",
        "trusted",
        "config",
        "wide_trusted",
    ]
    # the code never reads the organism's backdoor config either
    src = inspect.getsource(clean_module)
    assert "BackdoorConfig" not in src and ".backdoor" not in src


def test_cli_refuses_an_untrusted_corpus(capsys):
    code = main(
        [
            "clean",
            "--model",
            "organism",
            "--transcoders",
            "organism",
            "--corpus",
            "organism:poisoned",
            "--out",
            "/nonexistent",
        ]
    )
    assert code == 2
    assert "trusted corpus only" in capsys.readouterr().err
    args = ["clean", "--model", "organism", "--transcoders", "organism"]
    args += ["--corpus", "organism:trusted", "--out", "/nonexistent", "--attention-floor", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "attention_floor must be in [0, 1]" in err and len(err.strip().splitlines()) == 1


def test_feature_usage_counts_firing_positions(organism):
    model, tcs, trusted = organism
    acg = ACGModel(ModelWeights(model, tcs, 1))
    usage = feature_usage(acg, trusted[:1])
    trace = acg.run(trusted[0])
    mask = torch.ones_like(trace.tokens, dtype=torch.bool)
    mask[:, 0] = False
    mask &= trace.tokens != 0
    acts = trace.acts[2][mask]
    assert usage[2].positions == int(mask.sum())
    assert torch.allclose(usage[2].frequency, (acts > 0).float().mean(0))
    assert torch.allclose(usage[2].max_act, acts.max(0).values)


def test_clean_keeps_used_features_caps_and_compiles_exactly(organism):
    model, tcs, trusted = organism
    cfg = CleanConfig(min_frequency=1e-3, ceiling=1.0, drop_energy=1e-4)
    result = clean(model, tcs, trusted, cfg)
    for layer, keep in result.keep.items():
        u = result.usage[layer]
        assert torch.equal(keep, u.frequency >= 1e-3)
        assert result.transcoders[layer].d_sae == int(keep.sum()) < tcs[layer].d_sae
        assert result.transcoders[layer].cfg.activation == "jumprelu"
    assert 0 < int(result.info["input_rank"]["0"]) <= 128
    # on trusted data every activation stays under its cap
    trace = result.acg.run(trusted[0])
    for layer, acts in enumerate(trace.acts):
        ceiling = result.transcoders[layer].activation.ceiling
        assert bool((acts <= ceiling + 1e-6).all())
    # the cleaned graph compiles to a network that computes it
    compiled = compile_acg(result.acg, calibration=trusted[:1], ramp=1e-5)
    held = trusted[1][:4]
    p = result.acg(held).log_softmax(-1)
    q = hf_logits(compiled.model)(held).log_softmax(-1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 1e-4


def test_input_subspace_projects_out_unused_directions(organism):
    model, tcs, trusted = organism
    acg = ACGModel(ModelWeights(model, tcs, 1))
    P = input_subspaces(acg, trusted[:1], 1e-3)
    for proj in P.values():
        assert torch.allclose(proj @ proj, proj, atol=1e-4)  # a projector
        assert 0 < float(proj.trace()) < 128


def test_save_and_load_cleaned_roundtrip(organism, tmp_path):
    model, tcs, trusted = organism
    cfg = CleanConfig(min_frequency=1e-3, attention_kind="key-previous", attention_mode="mask")
    result = clean(model, tcs, trusted[:1], cfg)
    save_cleaned(result, tmp_path / "clean", {"note": "test"})
    loaded = load_transcoders(str(tmp_path / "clean"))  # as every --transcoders reads it
    assert result.acg.w.attention_bounds is not None  # on by default
    assert torch.equal(loaded.attention_bounds.peak, result.acg.w.attention_bounds.peak)
    assert (loaded.attention_bounds.kind, loaded.attention_bounds.mode) == ("key-previous", "mask")
    acg = ACGModel(ModelWeights(model, loaded, 1))
    toks = trusted[1][:2]
    assert torch.allclose(acg(toks), result.acg(toks), atol=1e-5)


def test_bad_thresholds_are_refused(organism):
    model, tcs, trusted = organism
    with pytest.raises(ConfigError):
        clean(model, tcs, trusted, CleanConfig(min_frequency=1.5))
    with pytest.raises(ConfigError):
        clean(model, tcs, trusted, CleanConfig(ceiling=0))
    with pytest.raises(ConfigError):
        clean(model, tcs, [], CleanConfig())
    with pytest.raises(ConfigError, match="attention_floor"):
        clean(model, tcs, trusted, CleanConfig(attention_floor=-0.1))
    with pytest.raises(ConfigError, match="attention_mode"):
        clean(model, tcs, trusted, CleanConfig(attention_mode="clip"))
    with pytest.raises(ConfigError, match="refine_steps"):
        clean(model, tcs, trusted, CleanConfig(refine_steps=-1))


def test_distill_keeps_the_budget_of_most_attributed_features(organism):
    from acgraph.safety.distill import distill, feature_attribution, select_features

    model, tcs, trusted = organism
    scores = feature_attribution(model, tcs, trusted[:1])
    assert all(s.shape == (tc.d_sae,) and bool((s >= 0).all()) for s, tc in
               zip(scores.values(), tcs.values(), strict=True))  # fmt: skip
    keep = select_features(scores, 0.25)
    for layer, mask in keep.items():
        assert int(mask.sum()) == round(0.25 * tcs[layer].d_sae)
        assert float(scores[layer][mask].min()) >= float(scores[layer][~mask].max())
    full = distill(model, tcs, trusted[:1], 1.0)
    toks = trusted[1][:2]
    assert torch.allclose(full.acg(toks), ACGModel(ModelWeights(model, tcs, 1))(toks), atol=1e-5)
    small = distill(model, tcs, trusted[:1], 0.1)
    assert [t.d_sae for t in small.transcoders.values()] == [
        round(0.1 * t.d_sae) for t in tcs.values()
    ]
    assert small.refine_kl == []
    with pytest.raises(ConfigError):
        select_features(scores, 0.0)
    with pytest.raises(ConfigError):
        distill(model, tcs, trusted[:1], 0.1, refine_steps=-1)


def test_distill_refines_the_kept_features_on_the_task(organism):
    from acgraph.safety.distill import distill

    model, tcs, trusted = organism
    task = trusted[:1]
    before = {i: tc.W_enc.detach().clone() for i, tc in tcs.items()}

    def kl(acg) -> float:
        with torch.no_grad():
            ref = model(task[0]).log_softmax(-1)[:, 1:]
            out = acg(task[0]).log_softmax(-1)[:, 1:]
        return float((ref.exp() * (ref - out)).sum(-1).mean())

    plain = distill(model, tcs, task, 0.25)
    refined = distill(model, tcs, task, 0.25, refine_steps=15, refine_lr=1e-3)
    assert all(torch.equal(plain.keep[i], refined.keep[i]) for i in tcs)
    assert len(refined.refine_kl) == 15
    assert kl(refined.acg) < 0.8 * kl(plain.acg)
    assert all(torch.equal(tc.W_enc, before[i]) for i, tc in tcs.items())  # originals untouched


def test_distill_mean_ablates_the_heads_outside_the_head_budget(organism):
    from acgraph.safety.distill import distill, select_heads, task_attribution, without_heads

    model, tcs, trusted = organism
    task, toks = trusted[:1], trusted[1][:2]
    scores = task_attribution(model, tcs, task)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert scores.heads.shape == (L, H) and bool((scores.heads > 0).all())
    keep = select_heads(scores.heads, 0.5)
    assert int(keep.sum()) == round(0.5 * L * H)
    assert float(scores.heads[keep].min()) >= float(scores.heads[~keep].max())

    def mean_ablate(z, hook):
        layer = int(hook.name.split(".")[1])
        dropped = ~keep[layer]
        z[:, :, dropped] = scores.mean_z[layer, dropped]
        return z

    hooks = [(f"blocks.{i}.attn.hook_z", mean_ablate) for i in range(L)]
    pruned = without_heads(model, keep, scores.mean_z)
    with torch.no_grad():
        expected = model.run_with_hooks(toks, fwd_hooks=hooks)
        assert torch.allclose(pruned(toks), expected, atol=1e-4)
        assert not torch.allclose(model(toks), expected, atol=1e-2)  # the original is untouched

    result = distill(model, tcs, task, 0.5, head_budget=0.5)
    assert torch.equal(result.heads, keep)
    assert result.acg.w.model is not model
    compiled = compile_acg(result.acg, calibration=task)
    assert compiled.info["nonzero_parameters"] < compiled.info["parameters"]
    with pytest.raises(ConfigError):
        select_heads(scores.heads, 1.5)
