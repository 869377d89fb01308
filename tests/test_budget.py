"""Device tiers and the step meter."""

import numpy as np
import pytest

from fedkd.budget import BudgetExceeded, StepBudget, assign_tiers


def test_budget_never_exceeds_its_limit():
    b = StepBudget(3)
    for _ in range(3):
        b.spend()
    assert b.remaining == 0
    with pytest.raises(BudgetExceeded):
        b.spend()
    assert b.state() == {"limit": 3, "spent": 3}


def test_tier_counts_follow_shares_exactly_and_are_seeded():
    t = assign_tiers(10, [0.5, 0.5], seed=0)
    assert np.bincount(t).tolist() == [5, 5]
    t3 = assign_tiers(7, [0.2, 0.3, 0.5], seed=1)
    assert np.bincount(t3, minlength=3).tolist() == [1, 2, 4]  # 1.4, 2.1, 3.5 -> largest remainder
    assert (assign_tiers(10, [0.5, 0.5], seed=0) == t).all()
    assert any((assign_tiers(10, [0.5, 0.5], seed=s) != t).any() for s in range(1, 5))


def test_budget_meter_never_exceeds_its_limit_under_random_spending():
    rng = np.random.default_rng(0)
    for _ in range(300):
        limit = int(rng.integers(0, 40))
        b = StepBudget(limit)
        for _ in range(int(rng.integers(1, 30))):
            ask = int(rng.integers(-2, 8))
            before = b.spent
            if ask < 0:  # a negative "refund" would let later spending pass the limit
                with pytest.raises(ValueError):
                    b.spend(ask)
                assert b.spent == before
            elif ask <= b.remaining:
                b.spend(ask)
                assert b.spent == before + ask
            else:
                with pytest.raises(BudgetExceeded):
                    b.spend(ask)
                assert b.spent == before  # a refused request spends nothing
            assert 0 <= b.spent <= b.limit == limit
            assert b.remaining == limit - b.spent >= 0
        while b.remaining:  # spending step by step stops exactly at the limit
            b.spend()
        assert b.spent == limit
        with pytest.raises(BudgetExceeded):
            b.spend()
