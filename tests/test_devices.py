"""Device profiles: named tiers, seeded per-client spread, trace files, availability."""

import json

import numpy as np
import pytest

from fedkd.budget import assign_tiers
from fedkd.devices import DeviceProfile, TraceError, client_profile, load_trace, online, tier_profiles

TIERS = dict(names="weak,mid,strong", shares="0.2,0.3,0.5", speed="0.1,0.4,1.0", memory_mb="64,128,256",
             uplink_kbps="250,1000,5000", downlink_kbps="1000,4000,20000", availability="0.5,0.8,1.0")


def test_tier_profiles_have_exact_shares_and_the_tier_values_without_spread():
    profiles = tier_profiles(**TIERS, num_clients=10, seed=7, spread=0.0)
    assert len(profiles) == 10
    assert [p.tier for p in profiles].count("weak") == 2
    assert [p.tier for p in profiles].count("mid") == 3
    assert [p.tier for p in profiles].count("strong") == 5
    # the device tier of a client is its step-budget tier
    idx = assign_tiers(10, [0.2, 0.3, 0.5], seed=7)
    assert [p.tier for p in profiles] == [["weak", "mid", "strong"][i] for i in idx]
    for p in profiles:
        expected = {"weak": (0.1, 64, 250, 1000, 0.5), "mid": (0.4, 128, 1000, 4000, 0.8),
                    "strong": (1.0, 256, 5000, 20000, 1.0)}[p.tier]
        assert (p.speed, p.memory_mb, p.uplink_kbps, p.downlink_kbps, p.availability) == expected
        assert p.online_rounds is None
    # sequences work as well as config strings
    seq = tier_profiles(["weak", "mid", "strong"], [0.2, 0.3, 0.5], speed=[0.1, 0.4, 1.0],
                        memory_mb=[64, 128, 256], uplink_kbps=[250, 1000, 5000],
                        downlink_kbps=[1000, 4000, 20000], availability=[0.5, 0.8, 1.0], num_clients=10, seed=7)
    assert seq == profiles


def test_spread_is_seeded_per_client_and_independent_of_the_fleet():
    small = tier_profiles(**TIERS, num_clients=10, seed=3, spread=0.5)
    again = tier_profiles(**TIERS, num_clients=10, seed=3, spread=0.5)
    assert small == again
    assert small != tier_profiles(**TIERS, num_clients=10, seed=4, spread=0.5)
    big = tier_profiles(**TIERS, num_clients=40, seed=3, spread=0.5)
    base = {p.tier: p for p in tier_profiles(**TIERS, num_clients=10, seed=3, spread=0.0)}
    for fleet in (small, big):
        for pid, p in enumerate(fleet):
            # the variation factor depends on (seed, partition id) only, not on fleet size or order
            assert p == client_profile(base[p.tier], seed=3, partition_id=pid, spread=0.5)
    factor = lambda p: p.speed / base[p.tier].speed  # noqa: E731
    for pid in range(10):
        assert factor(small[pid]) == pytest.approx(factor(big[pid]), rel=1e-12)
    speeds = np.array([factor(p) for p in big])
    assert speeds.std() > 0.1 and (speeds > 0).all()  # it really varies, and stays positive
    assert all(0 < p.availability < 1 for p in big if p.tier != "strong")
    assert all(p.availability == 1.0 for p in big if p.tier == "strong")  # 1 stays exact


def test_tier_values_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="tier-speed needs 1 value or 3"):
        tier_profiles(**{**TIERS, "speed": "0.1,1.0"}, num_clients=4, seed=0)
    with pytest.raises(ValueError, match="tier 'weak': availability"):
        tier_profiles(**{**TIERS, "availability": "1.5,0.8,1.0"}, num_clients=4, seed=0)
    with pytest.raises(ValueError, match="tier-uplink-kbps has a value that is not a number"):
        tier_profiles(**{**TIERS, "uplink_kbps": "fast,1,2"}, num_clients=4, seed=0)
    with pytest.raises(ValueError, match="speed must be a finite number > 0"):
        DeviceProfile("x", 0.0, 1, 1, 1, 1.0)


CSV = """client,tier,speed,memory_mb,uplink_kbps,downlink_kbps,availability,online_rounds
0,weak,0.25,64,500,2000,0.0,1;3
1,strong,1.5,256,5000,20000,1.0,
2,mid,0.75,128,1000,4000,0.5,2
"""


def test_csv_trace_drives_speed_and_availability_exactly_as_written(tmp_path):
    path = tmp_path / "fleet.csv"
    path.write_text(CSV)
    p = load_trace(path, num_clients=3)
    assert [x.speed for x in p] == [0.25, 1.5, 0.75]
    assert [x.tier for x in p] == ["weak", "strong", "mid"]
    assert (p[0].memory_mb, p[0].uplink_kbps, p[0].downlink_kbps) == (64, 500, 2000)
    # client 0: availability 0.0 but online_rounds 1;3 -> online in rounds 1 and 3 only, for any seed
    for seed in range(5):
        assert [online(p[0], seed, r, 0) for r in range(1, 7)] == [True, False, True, False, False, False]
        assert [online(p[2], seed, r, 2) for r in range(1, 5)] == [False, True, False, False]
        assert all(online(p[1], seed, r, 1) for r in range(1, 50))  # availability 1.0, no rounds given
    assert p[0].online_rounds == frozenset({1, 3}) and p[1].online_rounds is None


def test_json_trace_gives_the_same_fleet(tmp_path):
    rows = [{"client": 2, "tier": "mid", "speed": 0.75, "memory_mb": 128, "uplink_kbps": 1000,
             "downlink_kbps": 4000, "availability": 0.5, "online_rounds": [2]},
            {"client": 0, "tier": "weak", "speed": 0.25, "memory_mb": 64, "uplink_kbps": 500,
             "downlink_kbps": 2000, "availability": 0.0, "online_rounds": [1, 3]},
            {"client": 1, "tier": "strong", "speed": 1.5, "memory_mb": 256, "uplink_kbps": 5000,
             "downlink_kbps": 20000, "availability": 1.0, "online_rounds": None}]
    (tmp_path / "fleet.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"clients": rows}))
    (tmp_path / "fleet.csv").write_text(CSV)
    from_csv = load_trace(tmp_path / "fleet.csv", 3)
    assert load_trace(tmp_path / "fleet.json", 3) == from_csv
    assert load_trace(tmp_path / "wrapped.json", 3) == from_csv
    # rows beyond the fleet are ignored; an empty list is "never online"
    rows[0]["online_rounds"] = []
    (tmp_path / "never.json").write_text(json.dumps(rows))
    p = load_trace(tmp_path / "never.json", 3)
    assert not any(online(p[2], 0, r, 2) for r in range(1, 20))
    assert len(load_trace(tmp_path / "fleet.json", 2)) == 2


def test_availability_draws_are_reproducible_and_follow_the_probability():
    p = DeviceProfile("x", 1.0, 64, 100, 100, 0.3)
    draws = [online(p, 5, r, pid) for r in range(1, 41) for pid in range(50)]
    assert draws == [online(p, 5, r, pid) for r in range(1, 41) for pid in range(50)]
    assert draws != [online(p, 6, r, pid) for r in range(1, 41) for pid in range(50)]
    assert abs(np.mean(draws) - 0.3) < 0.03  # 2000 draws: sd 0.01
    assert not any(online(DeviceProfile("x", 1.0, 64, 100, 100, 0.0), 0, r, 0) for r in range(1, 100))


@pytest.mark.parametrize("line, field", [
    ("3,mid,fast,128,1000,4000,0.5,", "'speed' has invalid value 'fast'"),
    ("3,mid,0.5,128,-1,4000,0.5,", "'uplink_kbps' has invalid value '-1'"),
    ("3,mid,0.5,128,1000,4000,1.5,", "'availability' has invalid value '1.5'"),
    ("3,mid,0.5,128,1000,4000,0.5,1;x", "'online_rounds'"),
    ("3,mid,0.5,128,1000,4000,0.5,0", "'online_rounds'"),
    ("x,mid,0.5,128,1000,4000,0.5,", "'client' has invalid value 'x'"),
    ("1,mid,0.5,128,1000,4000,0.5,", "client 1 already given at line 3"),
    ("3,mid,0.5,128,1000,4000", "6 fields, the header has 8"),
])
def test_bad_csv_rows_fail_naming_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.csv"
    path.write_text(CSV + "\n" + line + "\n")  # a blank line 5, the bad row on line 6
    with pytest.raises(TraceError) as e:
        load_trace(path, num_clients=4)
    assert str(e.value).startswith(f"{path}: line 6")
    assert field in str(e.value)


def test_bad_json_entries_and_columns_fail_clearly(tmp_path):
    good = {"client": 0, "tier": "a", "speed": 1, "memory_mb": 1, "uplink_kbps": 1, "downlink_kbps": 1,
            "availability": 1}
    path = tmp_path / "t.json"
    path.write_text(json.dumps([good, {**good, "client": 1, "memory_mb": "lots"}]))
    with pytest.raises(TraceError, match=r"entry 2 \(client 1\): field 'memory_mb' has invalid value 'lots'"):
        load_trace(path, 2)
    path.write_text(json.dumps([{**good, "uplink_kbs": 3}]))
    with pytest.raises(TraceError, match="entry 1: unknown column.*'uplink_kbs'"):
        load_trace(path, 1)
    bad_header = tmp_path / "t.csv"
    bad_header.write_text("client,tier,speed\n0,a,1\n")
    with pytest.raises(TraceError, match="line 1 \\(header\\): missing column.*memory_mb"):
        load_trace(bad_header, 1)
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(_touch(tmp_path / "t.txt"), 1)


def _touch(path):
    path.write_text("")
    return path


def test_every_client_of_the_fleet_must_be_covered(tmp_path):
    path = tmp_path / "fleet.csv"
    path.write_text(CSV)
    with pytest.raises(TraceError, match=r"no row for client\(s\) 3, 4; the fleet has 5 clients"):
        load_trace(path, num_clients=5)
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "missing.csv", 1)
