"""Attention bounds: per head, a query token gives a key token no more weight than trusted data
ever did (or a floor); the excess goes to BOS, or such keys are masked before the softmax."""

from __future__ import annotations

import pytest
import torch

from acgraph.errors import ArtifactError, ConfigError
from acgraph.graph import ACGModel, AttentionBounds, ModelWeights
from acgraph.graph.attention_bounds import (
    FILENAME,
    KINDS,
    MODES,
    PeakAttention,
    attention_peaks,
)

torch.set_num_threads(1)


def _patterns(B: int, H: int, T: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    causal = torch.ones(T, T).tril().bool()
    return [
        torch.randn(B, H, T, T, generator=g).masked_fill(~causal, -1e9).softmax(-1)
        for _ in range(n)
    ]


def _pair(tokens: torch.Tensor, i: int, t: int, u: int, V: int, kind: str) -> int:
    """The pair id written out by hand: (query, key), (key, the token before it), or (key, the
    token after it if t > u)."""
    if kind == "query-key":
        return int(tokens[i, t]) * (V + 1) + int(tokens[i, u])
    if kind == "key-previous":
        return int(tokens[i, u]) * (V + 1) + (int(tokens[i, u - 1]) if u > 0 else V)
    return int(tokens[i, u]) * (V + 1) + (int(tokens[i, u + 1]) if t > u else V)


@pytest.mark.parametrize("kind", KINDS)
def test_peaks_are_the_largest_weight_per_head_and_token_pair(kind):
    V, B, H, T = 5, 3, 2, 7
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, 4:] = False  # padded query positions do not count
    first, second = _patterns(B, H, T, 2), _patterns(B, H, T, 2, seed=5)
    peaks = PeakAttention(V, kind)
    peaks.add(first, tokens, valid)
    peaks.add(second, tokens, valid)  # accumulates across batches
    b = peaks.bounds(0.0)
    assert bool((b.pairs[1:] > b.pairs[:-1]).all())  # sorted, unique
    for layer in range(2):
        for h in range(H):
            want: dict[int, float] = {}
            for pats in (first, second):
                for i in range(B):
                    for t in range(T):
                        for u in range(t + 1):
                            if valid[i, t]:
                                k = _pair(tokens, i, t, u, V, kind)
                                want[k] = max(want.get(k, 0.0), float(pats[layer][i, h, t, u]))
            got = {int(p): float(v) for p, v in zip(b.pairs, b.peak[layer, h], strict=True)}
            assert got.keys() == want.keys()
            assert all(abs(got[k] - want[k]) < 1e-7 for k in want)


def test_apply_caps_a_weight_at_its_limit_and_gives_the_excess_to_bos():
    V = 4
    # one seen pair (query 2, key 3) with peak 0.3 at head 0; head 1 saw it at 0.9
    bounds = AttentionBounds(
        torch.tensor([2 * (V + 1) + 3]), torch.tensor([[[0.3], [0.9]]]), V, 0.1, "query-key"
    )
    tokens = torch.tensor([[0, 3, 1, 2]])  # BOS, then 3, 1, and the query token 2
    pattern = torch.zeros(1, 2, 4, 4)
    pattern[..., 0, 0] = 1
    pattern[..., 1, :2] = torch.tensor([0.5, 0.5])
    pattern[..., 2, :3] = torch.tensor([0.2, 0.2, 0.6])
    pattern[..., 3, :4] = torch.tensor([0.1, 0.5, 0.35, 0.05])
    out = bounds.apply(0, pattern, tokens)
    assert torch.allclose(out.sum(-1), torch.ones(1, 2, 4))
    # query 2 -> key 3: head 0 capped at its peak 0.3, head 1 (peak 0.9) untouched
    assert out[0, 0, 3, 1] == pytest.approx(0.3) and out[0, 1, 3, 1] == pytest.approx(0.5)
    # query 2 -> key 1 (never seen): capped at the floor 0.1 in both heads
    assert out[0, 0, 3, 2] == pytest.approx(0.1) and out[0, 1, 3, 2] == pytest.approx(0.1)
    assert out[0, 0, 3, 3] == pytest.approx(0.05)  # under the floor: never capped
    assert out[0, 0, 3, 0] == pytest.approx(0.1 + 0.2 + 0.25)  # both excesses went to BOS
    assert out[0, 1, 3, 0] == pytest.approx(0.1 + 0.25)
    # query 1 -> key 3 (unseen, 0.2 > floor) and query 3 -> key 3 (0.5) are capped too
    assert out[0, 0, 2, 1] == pytest.approx(0.1) and out[0, 0, 1, 1] == pytest.approx(0.1)
    # keyed by the key and its next token instead: key 3 followed by 1 was seen at 0.3
    bigram = AttentionBounds(torch.tensor([3 * (V + 1) + 1]), bounds.peak, V, 0.1, "key-bigram")
    out = bigram.apply(0, pattern, tokens)
    assert out[0, 0, 3, 1] == pytest.approx(0.3) and out[0, 1, 3, 1] == pytest.approx(0.5)
    # the query itself as key: its next token is not visible, so never the seen bigram
    assert out[0, 0, 1, 1] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="floor"):
        AttentionBounds(torch.tensor([0]), torch.zeros(1, 1, 1), V, floor=1.5)
    with pytest.raises(ConfigError, match="kind"):
        AttentionBounds(torch.tensor([0]), torch.zeros(1, 1, 1), V, 0.1, "trigram")


def test_mask_mode_is_a_minus_infinity_before_the_softmax_on_unseen_keys():
    V, H, T = 4, 2, 5
    tokens = torch.tensor([[0, 3, 1, 2, 3]])
    scores = torch.randn(1, H, T, T, generator=torch.Generator().manual_seed(3))
    causal = torch.ones(T, T).tril().bool()
    pattern = scores.masked_fill(~causal, -torch.inf).softmax(-1)
    # key-previous pairs (sorted ids): key 1 after 3 at 0.5 in head 0 only, key 3 after 2 at
    # 0.05 in both (below the floor)
    pairs = torch.tensor([1 * (V + 1) + 3, 3 * (V + 1) + 2])
    peak = torch.tensor([[[0.5, 0.05], [0.0, 0.05]]])
    bounds = AttentionBounds(pairs, peak, V, 0.1, "key-previous", "mask")
    out = bounds.apply(0, pattern, tokens)
    # head 0 keeps BOS and key 2 (token 1 after 3, peak 0.5 >= floor); head 1 only BOS
    keep = torch.zeros(1, H, T, T, dtype=torch.bool)
    keep[..., 0] = True
    keep[0, 0, :, 2] = True
    want = scores.masked_fill(~(causal & keep), -torch.inf).softmax(-1)
    assert torch.allclose(out, want, atol=1e-6)
    # the same pairs as a cap: key 4 (3 after 2, peak 0.05) may still get up to the floor
    capped = AttentionBounds(pairs, peak, V, 0.1, "key-previous", "cap").apply(0, pattern, tokens)
    assert bool((capped[..., 1:] <= 0.1 + 1e-6).logical_or(keep[..., 1:]).all())
    assert bool((capped[0, 1, 4, 4] > 0) == (pattern[0, 1, 4, 4] > 0))
    with pytest.raises(ConfigError, match="mode"):
        AttentionBounds(pairs, peak, V, 0.1, "key-previous", "clip")


def test_a_bounded_graph_runs_trusted_text_unchanged_and_caps_other_text(
    trusted_organism, tmp_path
):
    model, tcs, trusted = trusted_organism
    bos = model.tokenizer.bos_token_id
    plain = ACGModel(ModelWeights(model, tcs, bos))
    bounds = attention_peaks(plain, trusted, floor=0.0)
    bounded = ACGModel(ModelWeights(model, tcs, bos, bounds))
    # every weight on the measured text is at most its own peak: nothing changes there
    for batch in trusted:
        assert torch.equal(bounded(batch), plain(batch))
    # a shuffled sequence puts tokens next to each other in ways trusted text never did
    g = torch.Generator().manual_seed(0)
    odd = trusted[0][:4].clone()
    odd[:, 1:] = odd[:, 1:][:, torch.randperm(odd.shape[1] - 1, generator=g)]
    a, b = plain.run(odd), bounded.run(odd)
    assert not torch.allclose(a.logits, b.logits)
    for layer, pattern in enumerate(b.pattern):
        assert torch.allclose(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), atol=1e-5)
        assert bool((pattern <= bounds.limits(layer, odd) + 1e-6)[..., 1:].all())
    # the bounds travel with the transcoder folder, as a cleaned set stores them
    bounds.save(tmp_path)
    loaded = AttentionBounds.load(tmp_path)
    assert torch.equal(loaded.pairs, bounds.pairs) and torch.equal(loaded.peak, bounds.peak)
    assert (loaded.vocab, loaded.floor, loaded.kind) == (bounds.vocab, bounds.floor, bounds.kind)
    # a masking, key-previous set keeps its kind and mode; masked trusted text is unchanged too
    prev = attention_peaks(plain, trusted, 0.0, kind="key-previous", mode="mask")
    masked = ACGModel(ModelWeights(model, tcs, bos, prev))
    real = trusted[0] != 0  # padded positions were never measured
    assert torch.allclose(masked(trusted[0])[real], plain(trusted[0])[real], atol=1e-4)
    assert not torch.allclose(masked(odd), plain(odd))
    prev.save(tmp_path)
    assert (AttentionBounds.load(tmp_path).kind, AttentionBounds.load(tmp_path).mode) == (
        "key-previous",
        "mask",
    )


def test_the_cli_offers_every_kind_and_mode():
    from acgraph.cli.safety import ATTENTION_KINDS, ATTENTION_MODES

    assert (ATTENTION_KINDS, ATTENTION_MODES) == (KINDS, MODES)


def test_a_damaged_bounds_file_is_refused(tmp_path):
    from acgraph.io import atomic_save_tensors

    atomic_save_tensors(tmp_path / FILENAME, {"pairs": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ArtifactError, match="attention-bounds"):
        AttentionBounds.load(tmp_path)
    assert AttentionBounds.load(tmp_path / "nothing") is None
