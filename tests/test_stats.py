"""Bootstrap intervals and verdicts (optimer_lib.experiments.stats): numbers checked against direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optimer_lib.experiments.stats import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    Criterion,
    Interval,
    bootstrap,
    bootstrap_methods,
    combine,
    mean_interval,
    paired_difference,
    recovery,
    seed_range,
)


def test_interval_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=(1, 400))
    iv = mean_interval(x, n_boot=4000)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert iv.mean == pytest.approx(x.mean())
    assert iv.low == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert iv.high == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_pairing_removes_shared_document_noise():
    """Two methods that differ by a constant 0.01 on very noisy documents: paired, the interval is tight."""
    rng = np.random.default_rng(2)
    docs = rng.normal(4.0, 2.0, size=(3, 200))
    a, b = docs - 0.01, docs
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(-0.01) and d.high < 0 and d.high - d.low < 1e-9
    unpaired = mean_interval(a).high - mean_interval(a).low
    assert unpaired > 0.1  # each mean alone is uncertain; the difference is not


def test_seeds_widen_the_interval_by_a_student_t_half_width():
    """Seeds that disagree widen the interval even when documents agree perfectly within a seed: by
    t(0.975, seeds − 1) · sd / √seeds, not to the seeds' range (what resampling 3 seeds gives: ~75% coverage)."""
    per_seed = np.array([[0.0] * 50, [1.0] * 50, [2.0] * 50])
    iv = mean_interval(per_seed)
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2) · sd([0, 1, 2]) / √3
    assert iv.seeds == 3 and iv.low == pytest.approx(1 - half, abs=1e-5) and iv.high == pytest.approx(1 + half,
                                                                                                     abs=1e-5)
    assert iv.low < 0.0 and iv.high > 2.0  # wider than the seeds' range
    one = mean_interval(per_seed[:1])
    assert one.seeds == 1 and one.low == one.high == 0.0


def test_seed_and_document_parts_add_in_quadrature():
    """Each side is the point ± √(t half-width² + that side's document-bootstrap distance²)."""
    rng = np.random.default_rng(4)
    a = rng.normal(0.0, 1.0, size=(4, 60)) + np.array([[0.0], [0.3], [0.1], [0.5]])
    iv = mean_interval(a, n_boot=500, seed=3)
    docs_only = mean_interval(a.mean(axis=0, keepdims=True), n_boot=500, seed=3)  # same picks, one "seed"
    half = 3.182446 * a.mean(axis=1).std(ddof=1) / 2.0  # t(0.975, 3) · sd / √4
    assert iv.low == pytest.approx(a.mean() - math.hypot(half, a.mean() - docs_only.low))
    assert iv.high == pytest.approx(a.mean() + math.hypot(half, docs_only.high - a.mean()))


def test_verdicts_need_the_whole_interval():
    below = Criterion("OptiMer beats the mixture", "below", 0.0)
    assert below.verdict(Interval(-0.2, -0.3, -0.1)) == HOLDS
    assert below.verdict(Interval(0.2, 0.1, 0.3)) == FAILS
    assert below.verdict(Interval(-0.05, -0.1, 0.02)) == INCONCLUSIVE  # point says yes, interval does not
    assert below.verdict(Interval(math.nan, math.nan, math.nan)) == INCONCLUSIVE
    above = Criterion("t tracks the fraction", "above", 0.9)
    assert above.verdict(Interval(0.95, 0.91, 0.99)) == HOLDS and above.verdict(Interval(0.5, 0.4, 0.9)) == FAILS
    with pytest.raises(ValueError):
        Criterion("x", "sideways", 0.0)


def test_recovery_share_and_its_gain():
    docs = np.linspace(3.0, 5.0, 100)[None, :].repeat(2, axis=0)
    base, mixture = docs, docs - 0.4
    merged = docs - 0.1  # recovers a quarter of the mixture's gain
    r, gain = recovery(base, merged, mixture)
    assert r.mean == pytest.approx(0.25) and r.low == pytest.approx(0.25) and r.high == pytest.approx(0.25)
    assert gain.mean == pytest.approx(0.4) and gain.low > 0
    flat_r, flat_gain = recovery(base, merged, base)  # no mixture gain: R has no honest interval
    assert math.isnan(flat_r.low) and flat_gain.high == 0.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        bootstrap(lambda a, b: a - b, np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="seeds, documents"):
        mean_interval(np.zeros((2, 0)))


def test_methods_bootstrap_takes_ratios_of_means_and_pairs_every_method():
    """A token-weighted loss is Σnll / Σtokens, not the mean of per-document losses; pairing cancels shared noise."""
    rng = np.random.default_rng(3)
    tok = rng.integers(1, 50, size=(2, 80)).astype(float)
    nll_a = tok * rng.uniform(2.0, 4.0, size=(2, 80))
    nll_b = nll_a + 0.1 * tok  # b's loss is exactly 0.1 higher on every token
    samples = {"a": {"nll": nll_a, "tok": tok}, "b": {"nll": nll_b, "tok": tok}}
    d = bootstrap_methods(lambda m: m["a"]["nll"] / m["a"]["tok"] - m["b"]["nll"] / m["b"]["tok"], samples)
    assert d.mean == pytest.approx(-0.1) and d.low == pytest.approx(-0.1) and d.high == pytest.approx(-0.1)
    one = bootstrap_methods(lambda m: m["a"]["nll"] / m["a"]["tok"], {"a": samples["a"]})
    assert one.mean == pytest.approx(nll_a.sum() / tok.sum()) != pytest.approx((nll_a / tok).mean())
    assert one.low < one.mean < one.high and one.seeds == 2


def test_seed_range_and_combined_verdicts():
    r = seed_range([0.2, 0.5, 0.35])
    assert (r.mean, r.low, r.high, r.level, r.seeds) == (pytest.approx(0.35), 0.2, 0.5, 1.0, 3)
    # "in every seed": one seed on the wrong side is enough to fail the claim
    assert Criterion("cos", "above", 0.1).every_seed(r) == HOLDS and Criterion("cos", "above", 0.3).every_seed(r) \
        == FAILS and Criterion("cos", "above", 0.6).every_seed(r) == FAILS
    assert Criterion("ratio", "below", 0.5).every_seed(r) == FAILS
    assert Criterion("ratio", "below", 0.5).every_seed(r, inclusive=True) == HOLDS  # "at most 0.5"
    assert Criterion("cos", "above", 0.2).every_seed(r, inclusive=True) == HOLDS
    assert Criterion("cos", "above", 0.1).every_seed(seed_range([0.2, math.nan])) == INCONCLUSIVE
    assert math.isnan(seed_range([]).low) and math.isnan(seed_range([1.0, math.nan]).mean)
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, FAILS, HOLDS]) == FAILS and combine([]) == INCONCLUSIVE


def test_every_draw_is_the_mean_of_its_picked_documents():
    """The vectorised draws (pick counts times the values) equal gathering each draw's picks one by one."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(1, 17))
    n_boot = 200
    got = bootstrap(lambda m: m, a, n_boot=n_boot, level=0.5, seed=11)
    cols = np.random.default_rng(11).integers(0, 17, (n_boot, 17))  # the stream bootstrap draws its picks from
    direct = np.array([a[0, c].mean() for c in cols])
    lo, hi = np.quantile(direct, [0.25, 0.75])
    assert got.mean == pytest.approx(a.mean()) and got.low == pytest.approx(lo) and got.high == pytest.approx(hi)


def test_the_interval_covers_the_true_mean_at_least_at_its_level_with_three_seeds():
    """Simulated findings: 3 seeds (normal seed effects) × 40 documents (normal noise, the same documents in every
    seed): the 95% interval of the mean covers the true mean in 93–99.5% of 400 data sets. Resampling the 3 seeds
    in the bootstrap instead (the method before 2026-12-05) covers 78% of these same data sets."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(400):
        docs = rng.normal(0.0, 1.0, size=(1, 40))          # the test documents: shared by every seed
        seeds = rng.normal(0.0, 1.0, size=(3, 1))          # what a seed changes
        data = docs + seeds + rng.normal(0.0, 0.3, size=(3, 40))
        iv = mean_interval(data, n_boot=400, seed=int(rng.integers(1 << 30)))
        hits += iv.low <= 0.0 <= iv.high
    assert 0.93 <= hits / 400 <= 0.995, hits / 400
