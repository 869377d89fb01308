"""Fleet scheduling: which width a device trains, and who is selected."""

import numpy as np
import pytest

from fedkd.config import ExperimentConfig
from fedkd.devices import DeviceProfile
from fedkd.models import ModelConfig
from fedkd.schedule import fleet_profiles, footprint_mb, select, width_for

MODEL = ModelConfig(kind="sasrec", num_items=1682, dim=16, blocks=1, heads=1, max_len=50)


def _device(memory_mb: float) -> DeviceProfile:
    return DeviceProfile(tier="t", speed=1, memory_mb=memory_mb, uplink_kbps=1, downlink_kbps=1, availability=1)


def test_footprint_counts_parameters_and_memory_picks_the_widest_fitting_width():
    # 29,456 parameters at width 16 (as in docs/results.md), 12 bytes each while training
    assert footprint_mb(MODEL, 16) == pytest.approx(29456 * 12 / 1e6)
    assert footprint_mb(MODEL, 4) < footprint_mb(MODEL, 8) < footprint_mb(MODEL, 16)
    assert width_for(_device(0.4), MODEL, [4, 8, 16]) == 16
    assert width_for(_device(0.2), MODEL, [4, 8, 16]) == 8
    assert width_for(_device(0.1), MODEL, [4, 8, 16]) == 4
    assert width_for(_device(0.05), MODEL, [4, 8, 16]) is None
    assert width_for(_device(0.1), MODEL, [16]) is None  # one width: a small device cannot train


def test_uniform_selection_matches_a_plain_seeded_draw():
    got = select(list(range(20)), 5, rng=np.random.default_rng([0, 8, 1]), policy="uniform",
                 tier_of={}, finishes={})
    assert got == sorted(np.random.default_rng([0, 8, 1]).choice(20, size=5, replace=False).tolist())
    assert select([3, 1], 0, rng=np.random.default_rng(0), policy="uniform", tier_of={}, finishes={}) == [1, 3]


def test_budget_selection_prefers_finishers_and_never_starves_a_tier():
    tier_of = {i: (0 if i < 10 else 1) for i in range(20)}
    finishes = {i: (i >= 10 or i == 3) for i in range(20)}  # of tier 0 only device 3 can finish
    for seed in range(20):
        got = select(list(range(20)), 6, rng=np.random.default_rng(seed), policy="budget",
                     tier_of=tier_of, finishes=finishes)
        assert len(got) == 6 and len(set(got)) == 6
        tier0 = [g for g in got if tier_of[g] == 0]
        assert tier0 and 3 in tier0  # its finisher first, and tier 0 keeps its seats
        assert len(tier0) == 3  # seats in proportion to online devices (10 of 20)


def test_budget_selection_fills_empty_seats_with_other_finishers():
    tier_of = {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    got = select(list(range(6)), 4, rng=np.random.default_rng(0), policy="budget", tier_of=tier_of,
                 finishes={i: True for i in range(6)})
    assert 0 in got and len(got) == 4


def test_fleet_profiles_follow_the_tier_settings():
    cfg = ExperimentConfig.from_flat({"tier-names": "weak,mid,strong", "tier-shares": "0.5,0.25,0.25",
                                      "tier-steps": "4,8,16", "tier-speed": "0.1,0.4,1", "tier-memory-mb": "1"})
    profiles = fleet_profiles(cfg, 40)
    assert [sum(p.tier == t for p in profiles) for t in ("weak", "mid", "strong")] == [20, 10, 10]
    assert {p.speed for p in profiles if p.tier == "weak"} == {0.1}
    assert {p.memory_mb for p in profiles} == {1.0}


def test_a_trace_with_an_unknown_tier_is_refused(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("client,tier,speed,memory_mb,uplink_kbps,downlink_kbps,availability\n"
                     "0,tablet,1,1,1,1,1\n")
    cfg = ExperimentConfig.from_flat({"device-trace": str(trace)})
    with pytest.raises(ValueError, match="tablet"):
        fleet_profiles(cfg, 1)
