"""The sampling chain (repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw) against
a brute-force full-sort implementation of the Hugging Face definitions written here."""
from __future__ import annotations

import numpy as np
import pytest

from llm_fast.sampling import Sampler, SamplingParams, apply_repetition_penalty


# --- the reference chain -------------------------------------------------------------------------

def hf_candidates(logits, params: SamplingParams, context=()):
    """(ids, probs) by the Hugging Face definitions, with a full sort of the vocabulary.

    repetition penalty (CTRL): logit > 0 divided by p, else multiplied; temperature; top-k keeps
    the k largest; top-p keeps the smallest prefix of the sorted, renormalised distribution whose
    mass reaches p (the crossing token kept whole); min-p drops probs < min_p * max prob.
    Ties are broken by the lower id first. The penalty acts on the float32 logits (as HF on a
    float32 model), the rest is float64.
    """
    x = np.array(logits, np.float32)
    if params.repetition_penalty != 1.0 and len(context):
        ids = np.unique(np.asarray(context))
        v = x[ids]
        x[ids] = np.where(v > 0, v / np.float32(params.repetition_penalty),
                          v * np.float32(params.repetition_penalty))
    x = x.astype(np.float64)
    if params.temperature == 0:
        return np.array([int(np.argmax(x))]), np.array([1.0])
    x = x / params.temperature
    order = np.lexsort((np.arange(x.size), -x))
    if 0 < params.top_k < x.size:
        order = order[:params.top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        keep = before < params.top_p
        order, p = order[keep], p[keep] / p[keep].sum()
    if params.min_p > 0:
        keep = p >= params.min_p * p[0]
        order, p = order[keep], p[keep] / p[keep].sum()
    return order, p


def assert_same_candidates(logits, params, context=(), what=""):
    ids, probs = Sampler(params).candidates(logits, context)
    want_ids, want_probs = hf_candidates(logits, params, context)
    ids, probs = np.asarray(ids), np.asarray(probs)
    assert len(ids) == len(want_ids), (f"{what}: kept {len(ids)} tokens, the full-sort reference "
                                       f"keeps {len(want_ids)} ({params})")
    np.testing.assert_array_equal(ids, want_ids, err_msg=what)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-7, atol=1e-12, err_msg=what)
    assert abs(probs.sum() - 1) < 1e-9


# --- SamplingParams validation ---------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1"), ("temperature", True), ("temperature", None),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("top_k", "40"),
    ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.5), ("top_p", 3), ("top_p", float("nan")),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", float("inf")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.2), ("repetition_penalty", "x"),
    ("seed", -1), ("seed", 1.5), ("seed", True), ("seed", "7"),
])
def test_params_validation(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert field in msg, msg
    assert repr(value) in msg or str(value) in msg, f"{msg!r} does not show the bad value {value!r}"


def test_params_valid_edges():
    SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0)
    SamplingParams(temperature=5, top_k=1, top_p=1e-9, min_p=1.0, repetition_penalty=0.5, seed=2 ** 63)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


# --- greedy, seeds -----------------------------------------------------------------------------------

def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams(temperature=0.0, seed=1))
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert s.sample(logits) == int(np.argmax(logits))
    tie = np.array([0.0, 3.0, 1.0, 3.0], np.float32)
    assert s.sample(tie) == 1  # ties: the lowest id


def test_greedy_with_repetition_penalty():
    logits = np.array([3.0, 2.9, -1.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))
    assert s.sample(logits, context_ids=[0]) == 1      # 3.0 / 1.5 = 2.0 < 2.9
    assert s.sample(logits, context_ids=[2]) == 0
    np.testing.assert_array_equal(logits, np.array([3.0, 2.9, -1.0], np.float32))  # untouched


def test_top_k_1_is_greedy():
    rng = np.random.default_rng(1)
    s = Sampler(SamplingParams(temperature=1.3, top_k=1, seed=5))
    for _ in range(50):
        logits = rng.standard_normal(777).astype(np.float32)
        assert s.sample(logits) == int(np.argmax(logits))


def _draws(seed, n=200, vocab=50):
    rng = np.random.default_rng(1234)
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.95, top_k=20, seed=seed))
    return [s.sample(rng.standard_normal(vocab).astype(np.float32)) for _ in range(n)]


def test_same_seed_same_sequence_and_different_seeds_differ():
    assert _draws(42) == _draws(42)
    assert _draws(42) != _draws(43)
    assert _draws(0) != _draws(1)


def test_sample_does_not_modify_logits():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(300).astype(np.float32)
    before = logits.copy()
    s = Sampler(SamplingParams(temperature=0.7, top_k=30, top_p=0.8, min_p=0.05,
                               repetition_penalty=1.3, seed=1))
    for _ in range(5):
        s.sample(logits, context_ids=[1, 2, 3, 5, 8])
    np.testing.assert_array_equal(logits, before)


# --- top-p, min-p, repetition penalty: exact kept sets -------------------------------------------

PROBS = np.array([0.05, 0.5, 0.1, 0.2, 0.15])        # sorted: id1 .5, id3 .2, id4 .15, id2 .1, id0 .05
LOGITS = np.log(PROBS).astype(np.float32) + np.float32(3.0)


@pytest.mark.parametrize("top_p, kept", [
    (0.05, [1]),
    (0.49, [1]),
    (0.51, [1, 3]),          # id3 crosses 0.51 and is kept whole
    (0.65, [1, 3]),
    (0.69, [1, 3]),
    (0.71, [1, 3, 4]),
    (0.84, [1, 3, 4]),
    (0.86, [1, 3, 4, 2]),
    (0.96, [1, 3, 4, 2, 0]),
    (1.0, [1, 3, 4, 2, 0]),
])
def test_top_p_kept_set(top_p, kept):
    ids, probs = Sampler(SamplingParams(top_p=top_p)).candidates(LOGITS)
    assert list(ids) == kept
    want = PROBS[kept] / PROBS[kept].sum()              # HF: renormalised over the kept set
    np.testing.assert_allclose(probs, want, rtol=1e-6)


@pytest.mark.parametrize("min_p, kept", [
    (0.0, [1, 3, 4, 2, 0]), (0.09, [1, 3, 4, 2, 0]), (0.11, [1, 3, 4, 2]), (0.25, [1, 3, 4]),
    (0.35, [1, 3]), (0.41, [1]), (1.0, [1]),
])
def test_min_p_kept_set(min_p, kept):
    ids, probs = Sampler(SamplingParams(min_p=min_p)).candidates(LOGITS)
    assert list(ids) == kept
    np.testing.assert_allclose(probs, PROBS[kept] / PROBS[kept].sum(), rtol=1e-6)


def test_top_k_then_top_p_renormalised():
    # top_k=3 keeps .5 .2 .15 (renormalised: .588 .235 .176); top_p=0.8 then keeps the first two
    # (0.588 < 0.8 before id4 is 0.824 >= 0.8), which a top-p over the unrenormalised mass would not
    ids, probs = Sampler(SamplingParams(top_k=3, top_p=0.8)).candidates(LOGITS)
    assert list(ids) == [1, 3]
    np.testing.assert_allclose(probs, [0.5 / 0.7, 0.2 / 0.7], rtol=1e-6)


def test_temperature_scales_logits():
    for t in (0.3, 1.0, 2.5):
        ids, probs = Sampler(SamplingParams(temperature=t)).candidates(LOGITS)
        p = PROBS ** (1 / t)
        p /= p.sum()
        np.testing.assert_allclose(probs, p[ids], rtol=1e-6)


def test_repetition_penalty_hf_rule():
    logits = np.array([2.0, -1.0, 0.5, 3.0, 0.0, -4.0], np.float32)
    x = logits.copy()
    apply_repetition_penalty(x, [0, 1, 1, 4, 5], 2.0)
    np.testing.assert_array_equal(x, [1.0, -2.0, 0.5, 3.0, 0.0, -8.0])   # each id penalised once
    x = logits.copy()
    apply_repetition_penalty(x, [0, 1], 0.5)                             # p < 1 rewards
    np.testing.assert_array_equal(x, [4.0, -0.5, 0.5, 3.0, 0.0, -4.0])
    x = logits.copy()
    apply_repetition_penalty(x, [], 2.0)
    apply_repetition_penalty(x, [0, 1], 1.0)
    np.testing.assert_array_equal(x, logits)
    params = SamplingParams(repetition_penalty=1.7, top_p=0.9, seed=0)
    assert_same_candidates(logits, params, context=[3, 3, 0, 5], what="penalty chain")


def test_chain_matches_reference_small_vocab():
    rng = np.random.default_rng(3)
    for trial in range(40):
        logits = (rng.standard_normal(64) * rng.uniform(0.5, 4)).astype(np.float32)
        params = SamplingParams(temperature=float(rng.uniform(0.2, 2.0)), top_k=int(rng.integers(0, 70)),
                                top_p=float(rng.uniform(0.05, 1.0)), min_p=float(rng.choice([0, 0.02, 0.2])),
                                repetition_penalty=float(rng.choice([1.0, 1.3])), seed=trial)
        assert_same_candidates(logits, params, context=rng.integers(0, 64, 5), what=f"trial {trial}")


# --- the draw: distribution ---------------------------------------------------------------------------

def _chi_square(counts, probs):
    n = counts.sum()
    exp = n * np.asarray(probs)
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("params, ids, probs", [
    (SamplingParams(temperature=1.0, seed=7), [1, 3, 4, 2, 0], PROBS[[1, 3, 4, 2, 0]]),
    (SamplingParams(temperature=0.7, top_k=3, seed=8), None, None),
    (SamplingParams(temperature=1.5, top_p=0.8, seed=9), None, None),
])
def test_draw_distribution(params, ids, probs):
    if ids is None:
        ids, probs = hf_candidates(LOGITS, params)
    s = Sampler(params)
    n = 20000
    draws = np.array([s.sample(LOGITS) for _ in range(n)])
    assert set(np.unique(draws)) <= set(int(i) for i in ids)
    counts = np.array([(draws == i).sum() for i in ids])
    chi2 = _chi_square(counts, probs)
    # df <= 4: P(chi2 > 25) < 5e-5 for a correct sampler
    assert chi2 < 25.0, f"chi-square {chi2:.1f}: counts {counts.tolist()} vs expected {(n * np.asarray(probs)).round().tolist()}"


# --- big vocabulary: the candidate shortcut must stay exact -------------------------------------------

V = 49152


def _big_logits(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "peaked":           # the top 1024 hold nearly all mass
        return (rng.standard_normal(V) * 4.0).astype(np.float32)
    if kind == "near_uniform":     # the top 1024 hold ~2%: the shortcut must fall back
        return (rng.standard_normal(V) * 0.01).astype(np.float32)
    if kind == "mid":              # the top 1024 hold some but not enough of top_p
        return (rng.standard_normal(V) * 1.2).astype(np.float32)
    if kind == "heavy_head":       # 100 strong tokens holding half the mass, a nearly flat tail
        p = np.full(V, 0.5 / (V - 100))
        p[:100] = 0.5 / 100 * np.linspace(1.5, 0.5, 100)
        x = np.log(p / p.sum())
        x[100:] += np.arange(V - 100) * 1e-5   # distinct float32 values: no ties to break
        x = x.astype(np.float32)[rng.permutation(V)]
        assert np.unique(x).size == V
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["peaked", "near_uniform", "mid", "heavy_head"])
@pytest.mark.parametrize("params", [
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.5, temperature=0.8),
    SamplingParams(top_p=0.95, top_k=50),
    SamplingParams(top_p=0.99, top_k=1024),
    SamplingParams(top_k=40),
    SamplingParams(top_k=3000),
    SamplingParams(top_p=0.9, min_p=0.05),
    SamplingParams(top_p=0.3, repetition_penalty=1.2),
], ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}-r{p.repetition_penalty}")
def test_big_vocab_candidates_exact(kind, params):
    logits = _big_logits(kind)
    assert_same_candidates(logits, params, context=[5, 17, 40000], what=kind)


def test_big_vocab_fallback_near_uniform_keeps_most():
    logits = _big_logits("near_uniform")
    ids, probs = Sampler(SamplingParams(top_p=0.9)).candidates(logits)
    assert len(ids) > 1024 * 8  # far beyond the first candidate window
    s = Sampler(SamplingParams(top_p=0.9, seed=3))
    kept = set(int(i) for i in ids)
    assert all(s.sample(logits) in kept for _ in range(50))


def test_big_vocab_top_k_above_candidates_then_top_p():
    # 100 tokens hold about half the mass, the 1024 most likely more than 0.3 of it: the shortcut
    # path. top_k=2000 keeps ~0.52 of the mass, so HF's top-p over the renormalised top-k stops
    # at ~0.3 * 0.52 of the global mass, far earlier than a top-p over the global mass.
    logits = _big_logits("heavy_head")
    p = np.exp(logits.astype(np.float64) - logits.max())
    p = np.sort(p / p.sum())[::-1]
    assert p[:1024].sum() >= 0.3 and p[:2000].sum() < 0.6
    assert_same_candidates(logits, SamplingParams(top_k=2000, top_p=0.3), what="heavy_head")


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_k=0, seed=3),
                                    SamplingParams(temperature=1.3, top_k=0, seed=4),
                                    SamplingParams(temperature=1.0, top_k=2000, seed=5),
                                    SamplingParams(temperature=0.9, top_k=0, repetition_penalty=1.3, seed=6)])
def test_draw_without_top_p_equals_the_full_order_walk(params):
    """top_p = 1, min_p = 0 (OpenAI's defaults): sample() sorts only the head of the order it
    walks; the token equals the full most-likely-first walk with the same uniform number."""
    rng = np.random.default_rng(11)
    fast, slow = Sampler(params), Sampler(params)
    context = [5, 17, 40000]
    for trial in range(150):
        scale = (0.5, 3.0, 12.0)[trial % 3]           # flat (long walks) to peaky
        logits = (rng.standard_normal(49152) * scale).astype(np.float32)
        got = fast.sample(logits, context)
        ids, probs = slow.candidates(logits, context)
        u = slow.rng.random()
        j = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        assert got == int(ids[min(j, len(ids) - 1)]), trial
