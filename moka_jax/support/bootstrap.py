"""Percentile bootstrap intervals over items for ratio-of-sums measures.

    gain = paired_ratio_interval([((nll_before, tokens), (nll_after, tokens))])
    # [estimate, low, high]: per-token NLL before minus after, 95% interval

A measure is sum(numerator) / sum(weight) over items: NLL per token (numerator = an example's
summed NLL, weight = its token count) or accuracy (numerator = 0/1, weight = 1). Items are the
resampling unit, drawn with replacement; "paired" means both sides are resampled with the same
indices, so what is shared between them (an example's difficulty) cancels. Groups (e.g. seeds)
each resample their own items; the statistic is the mean over groups.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 10_000


def _ratios(num, den, idx_RN):
    return num[idx_RN].sum(-1) / den[idx_RN].sum(-1)


def _as_pair(side) -> tuple[np.ndarray, np.ndarray]:
    num, den = (np.asarray(x, np.float64) for x in side)
    if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
        raise ValueError(f"numerators {num.shape} and weights {den.shape}: need equal, "
                         "non-empty 1-d arrays")
    return num, den


def _interval(groups, stat, n_boot: int, rng, level: float) -> list[float]:
    """[stat on all items, low, high] with stat(group, idx_RN) -> (R,) per group, averaged."""
    if not groups:
        raise ValueError("no groups to resample")
    rng = np.random.default_rng(rng)
    n = [len(g[0][0]) for g in groups]
    est = float(np.mean([stat(g, np.arange(k)[None])[0] for g, k in zip(groups, n)]))
    boots = np.mean([stat(g, rng.integers(0, k, (n_boot, k))) for g, k in zip(groups, n)], 0)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return [est, float(lo), float(hi)]


def paired_ratio_interval(pairs, *, n_boot: int = N_BOOT, rng=0,
                          level: float = 0.95) -> list[float]:
    """[estimate, low, high] of measure(a) - measure(b).

    pairs: per group ((numerator_a, weight_a), (numerator_b, weight_b)), item i of a and of b
    being the same item. rng: a numpy Generator or a seed."""
    groups = []
    for a, b in pairs:
        a, b = _as_pair(a), _as_pair(b)
        if len(a[0]) != len(b[0]):
            raise ValueError(f"paired sides have {len(a[0])} and {len(b[0])} items")
        groups.append((a, b))

    def diff(g, idx):
        (na, wa), (nb, wb) = g
        return _ratios(na, wa, idx) - _ratios(nb, wb, idx)

    return _interval(groups, diff, n_boot, rng, level)


def ratio_interval(groups, *, n_boot: int = N_BOOT, rng=0, level: float = 0.95) -> list[float]:
    """[estimate, low, high] of one measure; groups: per group (numerator, weight)."""
    groups = [(_as_pair(g),) for g in groups]
    return _interval(groups, lambda g, idx: _ratios(*g[0], idx), n_boot, rng, level)


__all__ = ["N_BOOT", "paired_ratio_interval", "ratio_interval"]
