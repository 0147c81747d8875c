"""support.bootstrap against independent references: the plain ratio of sums, a per-resample
loop drawing the same indices, and the normal-theory interval of a mean difference."""

import numpy as np
import pytest

from moka_jax.support.bootstrap import paired_ratio_interval, ratio_interval


def _loop_reference(na, wa, nb, wb, n_boot, seed):
    """One resample at a time, as a textbook writes it (same generator calls, same draws)."""
    rng = np.random.default_rng(seed)
    idx_all = rng.integers(0, len(na), (n_boot, len(na)))
    boots = []
    for idx in idx_all:
        boots.append(sum(na[i] for i in idx) / sum(wa[i] for i in idx)
                     - sum(nb[i] for i in idx) / sum(wb[i] for i in idx))
    return np.percentile(boots, [2.5, 97.5])


def test_paired_interval_matches_a_plain_loop_and_the_ratio_of_sums():
    rng = np.random.default_rng(1)
    w = rng.integers(20, 200, 40).astype(float)         # tokens per example
    na, nb = w * rng.uniform(0.8, 1.2, 40), w * rng.uniform(0.6, 1.0, 40)
    est, lo, hi = paired_ratio_interval([((na, w), (nb, w))], n_boot=500, rng=7)
    assert est == pytest.approx(na.sum() / w.sum() - nb.sum() / w.sum())
    np.testing.assert_allclose([lo, hi], _loop_reference(na, w, nb, w, 500, 7), rtol=1e-12)


def test_paired_interval_agrees_with_normal_theory_for_a_mean_difference():
    rng = np.random.default_rng(2)
    a = rng.normal(1.0, 1.0, 400)
    b = a - 0.2 + rng.normal(0, 0.5, 400)               # paired: b shares a's item effect
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    one = np.ones_like(a)
    est, lo, hi = paired_ratio_interval([((a, one), (b, one))], n_boot=20_000, rng=0)
    assert est == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_identical_sides_give_a_zero_interval_and_groups_average():
    x, w = np.array([1.0, 0, 1, 1]), np.ones(4)
    assert paired_ratio_interval([((x, w), (x, w))] * 2, n_boot=100) == [0.0, 0.0, 0.0]
    est, lo, hi = ratio_interval([(x, w), (1 - x, w)], n_boot=100)
    assert est == pytest.approx(0.5) and lo <= 0.5 <= hi


def test_mismatched_items_are_refused():
    with pytest.raises(ValueError, match="3 and 2 items"):
        paired_ratio_interval([((np.ones(3), np.ones(3)), (np.ones(2), np.ones(2)))])
    with pytest.raises(ValueError, match="non-empty"):
        ratio_interval([(np.ones(3), np.ones(2))])
