"""scalebio.stats: the paired bootstrap finds no difference between identical arms and the sign of a clear one,
verdicts follow the metric's direction, Spearman and the per-document metric agree with direct computations."""

import numpy as np
import pytest

from scalebio.stats import Ratio, paired_bootstrap, sample_metric, spearman, task_ratios, verdict


def _nll_arm(rng, runs=3, docs=60, shift=0.0) -> Ratio:
    """Token-weighted NLL: per-document NLL sums over 5..40 tokens of ~1.5 nats/token (+ shift per token)."""
    tokens = rng.integers(5, 40, size=docs).astype(float)
    per_token = 1.5 + 0.3 * rng.standard_normal((runs, docs)) + shift
    return Ratio(per_token * tokens, np.broadcast_to(tokens, (runs, docs)).copy())


def test_identical_arms_are_inconclusive():
    arm = _nll_arm(np.random.default_rng(0))
    result = paired_bootstrap(arm, arm, iters=500)
    # Paired: every draw takes the same documents and seeds for both arms, so every difference is exactly 0.
    assert result.difference == result.lo == result.hi == 0.0
    assert verdict(result.lo, result.hi, lower_is_better=True) == "inconclusive"
    # Two arms that differ by noise only: the interval still covers 0.
    other = Ratio(arm.num + 0.3 * np.random.default_rng(1).standard_normal(arm.num.shape) * arm.den, arm.den)
    noisy = paired_bootstrap(other, arm, iters=500)
    assert noisy.lo < 0.0 < noisy.hi and noisy.difference != 0.0


def test_shifted_arm_excludes_zero_in_its_direction():
    rng = np.random.default_rng(0)
    uniform = _nll_arm(rng)
    learned = Ratio(uniform.num - 0.2 * uniform.den, uniform.den)  # 0.2 nats/token better on every document
    better = paired_bootstrap(learned, uniform, iters=500)
    assert better.difference == pytest.approx(-0.2)
    assert better.hi < 0 and verdict(better.lo, better.hi, lower_is_better=True) == "reproduced"
    worse = paired_bootstrap(uniform, learned, iters=500)
    assert worse.lo > 0 and verdict(worse.lo, worse.hi, lower_is_better=True) == "contradicted"

    # Higher is better (exact match): learned solves 30 more of 100 questions in every run.
    uniform_em = (rng.random((3, 100)) < 0.3).astype(float)
    learned_em = uniform_em.copy()
    learned_em[:, np.flatnonzero(uniform_em.sum(0) == 0)[:30]] = 1.0
    ones = np.ones((3, 100))
    em = paired_bootstrap(Ratio(learned_em, ones), Ratio(uniform_em, ones), iters=500)
    assert em.difference == pytest.approx(0.3) and em.lo > 0
    assert verdict(em.lo, em.hi, lower_is_better=False) == "reproduced"
    assert verdict(-em.hi, -em.lo, lower_is_better=False) == "contradicted"


def test_bootstrap_is_seeded_and_resamples_seeds():
    rng = np.random.default_rng(0)
    uniform = _nll_arm(rng, docs=200)
    # Documents identical across runs, runs offset: only the seed resampling spreads the interval.
    one = uniform.num[:1].repeat(3, 0)
    den = uniform.den
    learned = Ratio(one + np.array([[-0.3], [0.0], [0.3]]) * den, den)
    base = Ratio(one, den)
    first = paired_bootstrap(learned, base, iters=400, seed=3)
    assert first == paired_bootstrap(learned, base, iters=400, seed=3)
    assert first != paired_bootstrap(learned, base, iters=400, seed=4)
    assert first.lo < -0.1 and first.hi > 0.1  # the ±0.3 seed offsets, not a zero-width interval
    assert first.difference == pytest.approx(0.0, abs=1e-12)


def test_spearman():
    w = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    assert spearman(w, dict(w)) == pytest.approx(1.0)
    reversed_w = dict(zip(w, sorted(w.values())))
    assert spearman(w, reversed_w) == pytest.approx(-1.0)
    assert spearman(w, {"a": 1.0, "b": 2.0, "zzz": 0.0}) == pytest.approx(-1.0)  # shared keys only
    with pytest.raises(ValueError):
        spearman(w, {"a": 1.0})


def test_task_ratios_from_samples():
    run = [{"task": "t", "doc_id": 1, "nll": 6.0, "n_tokens": 3, "n_bytes": 9},
           {"task": "t", "doc_id": 0, "nll": 2.0, "n_tokens": 1, "n_bytes": 4},
           {"task": "em", "doc_id": 0, "filter": "extract", "exact_match": 1},
           {"task": "em", "doc_id": 1, "filter": "extract", "exact_match": 0}]
    ratios = task_ratios([run, run])
    assert sorted(ratios) == [("em", "exact_match,extract"), ("t", "nll_per_token")]
    assert ratios[("t", "nll_per_token")].per_run().tolist() == [2.0, 2.0]  # (2 + 6) / (1 + 3)
    assert ratios[("em", "exact_match,extract")].per_run().tolist() == [0.5, 0.5]
    assert sample_metric({"nll": np.log(2) * 8, "n_bytes": 4}) == ("bits_per_byte", pytest.approx(8.0), 4.0)
    with pytest.raises(ValueError, match="different documents"):
        task_ratios([run, run[1:]])
