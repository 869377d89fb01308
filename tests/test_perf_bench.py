"""The benchmark's arithmetic (simulations/perf_bench.py); the timings themselves live in
docs/performance.md, not in tests."""

import numpy as np
import pytest

from simulations.perf_bench import BareLoop, profile_rows, slope, steady


def test_steady_state_skips_the_first_and_the_validating_last_round():
    rows = [{"round": r, "round_s": s} for r, s in [(1, 30.0), (2, 2.0), (3, 3.0), (4, 50.0)]]
    metrics = [{"aggregated": a} for a in (10, 20, 40, 10)]
    secs, ups, rate = steady(rows, metrics)
    assert (secs, ups) == (5.0, 60)
    assert rate == pytest.approx(12.0)


def test_steady_state_needs_three_rounds():
    with pytest.raises(ValueError, match="at least 3 rounds"):
        steady([{"round": 1, "round_s": 1.0}, {"round": 2, "round_s": 1.0}], [{"aggregated": 1}] * 2)


def test_slope_recovers_a_line_and_reports_the_fit():
    xs = [25, 50, 100, 200]
    a, b, r2 = slope(xs, [0.5 + 0.01 * x for x in xs])
    assert (a, b, r2) == pytest.approx((0.5, 0.01, 1.0))
    _, _, r2_curved = slope(xs, [0.5 + 1e-4 * x * x for x in xs])
    assert r2_curved < 0.999


def test_profile_wait_is_exchange_minus_audit_over_steady_rounds():
    rows = [{"round": r, "round_s": 9.0, "exchange_s": e, "audit_s": a} for r, e, a in
            [(1, 100.0, 1.0), (2, 4.0, 1.0), (3, 6.0, 1.0), (4, 100.0, 1.0)]]
    prof = profile_rows(rows)
    assert prof["exchange_s"] == 5.0
    assert prof["wait_s"] == 4.0
    assert prof["accept_s"] == 0.0  # sections an older timing.csv lacks count as 0


def test_bare_loop_does_every_selected_clients_full_step_allowance(tmp_path):
    overrides = {"synthetic-users": 30, "num-rounds": 3, "clients-per-round": 5, "teacher-epochs": 1,
                 "cache-dir": str(tmp_path / "cache"), "output-dir": str(tmp_path)}
    bare = BareLoop(overrides, tmp_path)
    res = bare.run(threads=1)
    steps = {name: s for name, _, s in bare.cfg.tiers}
    assert [r["aggregated"] for r in res["rounds"]] == [5, 5, 5]
    assert len(set(bare.tier_of.values())) == 2
    # every round's steps are a sum of 5 tier allowances (4 or 16 by default)
    allowed = {a * steps["weak"] + (5 - a) * steps["strong"] for a in range(6)}
    assert all(r["steps"] in allowed for r in res["rounds"])
    assert res["updates_per_s"] > 0 and np.isfinite(res["steady_s"])
