import numpy as np

from fedkd.stats import paired_bootstrap


def test_identical_runs_give_a_zero_width_interval_at_zero():
    a = np.random.default_rng(0).random(50)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def test_constant_shift_is_recovered_exactly():
    a = np.random.default_rng(0).random(50)
    mean, lo, hi = paired_bootstrap(a + 0.1, a)
    assert np.isclose(mean, 0.1) and np.isclose(lo, 0.1) and np.isclose(hi, 0.1)


def test_interval_covers_the_mean_and_excludes_zero_for_a_clear_effect():
    rng = np.random.default_rng(1)
    b = rng.random(400)
    a = b + 0.05 + rng.normal(0, 0.05, 400)
    mean, lo, hi = paired_bootstrap(a, b, strata=np.repeat([0, 1], 200))
    assert lo < mean < hi and lo > 0
