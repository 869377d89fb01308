"""Paired comparisons of two runs over the same test users."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000,
                     seed: int = 0, level: float = 0.95,
                     strata: Sequence[int] | None = None) -> tuple[float, float, float]:
    """Mean of ``a - b`` and a percentile bootstrap interval, resampling users (pairs) with
    replacement, within each stratum (e.g. seed) when ``strata`` is given.

    Pairing matters: both runs score the same users, so per-user differences remove most
    of the between-user variance that unpaired intervals would carry.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        raise ValueError("no paired observations")
    groups = [np.flatnonzero(np.asarray(strata) == s) for s in np.unique(strata)] if strata is not None \
        else [np.arange(d.size)]
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for g in groups:
        idx = g[rng.integers(0, g.size, size=(resamples, g.size))]  # (R, |g|)
        means += d[idx].sum(axis=1)
    means /= d.size
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)
