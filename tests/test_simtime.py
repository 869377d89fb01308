"""Simulated round time, deadlines and stragglers, and calibration profiles."""

import json

import pytest

from fedkd.devices import DeviceProfile
from fedkd.simtime import (CALIBRATION_FORMAT, ClientTiming, SimClock, infer_seconds, load_calibration,
                           plan_client, relative_speed, round_seconds, round_wall_seconds, step_seconds,
                           steps_within, transfer_seconds)

# 1000 kbit/s down, 500 kbit/s up, half the calibrated machine's speed
DEV = DeviceProfile(tier="weak", speed=0.5, memory_mb=64, uplink_kbps=500, downlink_kbps=1000, availability=1.0)
DOWN, UP, STEP = 250_000, 125_000, 0.05


def test_round_time_equals_the_hand_computed_formula():
    # download: 250_000 B * 8 = 2_000_000 bit at 1000 kbit/s = 1_000_000 bit/s -> 2.0 s
    assert transfer_seconds(DOWN, 1000) == pytest.approx(2.0)
    # compute: 10 steps * 0.05 s/step / speed 0.5 -> 1.0 s
    # upload: 125_000 B * 8 = 1_000_000 bit at 500 kbit/s = 500_000 bit/s -> 2.0 s
    assert transfer_seconds(UP, 500) == pytest.approx(2.0)
    assert round_seconds(DOWN, UP, 10, STEP, DEV) == pytest.approx(5.0)
    t = plan_client(DEV, down_bytes=DOWN, up_bytes=UP, step_seconds=STEP, max_steps=10)  # no deadline
    assert (t.download_s, t.compute_s, t.upload_s, t.total_s) == pytest.approx((2.0, 1.0, 2.0, 5.0))
    assert t.steps == 10 and not t.straggler and t.used


def test_steps_within_boundaries():
    # 5.0 s deadline: 4.0 s of transfers leave 1.0 s = exactly 10 steps of 0.1 s
    assert steps_within(5.0, DOWN, UP, STEP, DEV, max_steps=100) == 10
    # one byte more to download (8 bits = 8 us) and the 10th step no longer fits
    assert steps_within(5.0, DOWN + 1, UP, STEP, DEV, max_steps=100) == 9
    # the budget caps what fits
    assert steps_within(5.0, DOWN, UP, STEP, DEV, max_steps=4) == 4
    # transfers alone take exactly the deadline: 0 steps; take longer: still 0, never negative
    assert steps_within(4.0, DOWN, UP, STEP, DEV, max_steps=100) == 0
    assert steps_within(3.0, DOWN, UP, STEP, DEV, max_steps=100) == 0
    # just short of a step
    assert steps_within(4.0999, DOWN, UP, STEP, DEV, max_steps=100) == 0
    assert steps_within(4.1, DOWN, UP, STEP, DEV, max_steps=100) == 1
    # whatever fits really does finish in time, and one more step would not
    for deadline in (4.05, 4.33, 4.999, 5.0, 7.77):
        n = steps_within(deadline, DOWN, UP, STEP, DEV, max_steps=1000)
        assert round_seconds(DOWN, UP, n, STEP, DEV) <= deadline + 1e-9
        assert round_seconds(DOWN, UP, n + 1, STEP, DEV) > deadline


def test_deadline_shorter_than_the_transfers_makes_a_straggler_under_both_policies():
    for policy in ("drop", "partial"):
        t = plan_client(DEV, down_bytes=DOWN, up_bytes=UP, step_seconds=STEP, max_steps=10, deadline_s=3.0,
                        policy=policy)
        assert t.straggler and t.steps == 0 and not t.used
        assert t.total_s == pytest.approx(4.1)  # what the 1 step it needed would have taken
        assert round_wall_seconds([t], deadline_s=3.0) == 3.0  # the server waited until the deadline


def test_drop_versus_partial():
    # 4.5 s: 5 steps fit; the client must run at least 8 to count
    kw = dict(down_bytes=DOWN, up_bytes=UP, step_seconds=STEP, max_steps=10, deadline_s=4.5, min_steps=8)
    drop = plan_client(DEV, policy="drop", **kw)
    assert drop.straggler and drop.steps == 0 and not drop.used
    assert drop.total_s == pytest.approx(4.0 + 0.8)  # the 8 steps it would have needed
    partial = plan_client(DEV, policy="partial", **kw)
    assert partial.straggler and partial.steps == 5 and partial.used
    assert partial.total_s == pytest.approx(4.5)
    # enough time: no straggler, and the budget caps the steps
    ok = plan_client(DEV, policy="drop", **{**kw, "deadline_s": 60.0})
    assert not ok.straggler and ok.steps == 10 and ok.total_s == pytest.approx(5.0)
    # min_steps 1 (default): a client that fits 5 of its 10 steps runs 5 and is no straggler
    five = plan_client(DEV, **{**kw, "min_steps": 1})
    assert not five.straggler and five.steps == 5
    with pytest.raises(ValueError, match="policy"):
        plan_client(DEV, policy="wait", **kw)
    with pytest.raises(ValueError, match="min_steps"):
        plan_client(DEV, **{**kw, "min_steps": 11})


def test_round_wall_time_and_clock():
    fast = ClientTiming(1.0, 1.0, 1.0, 3.0, 4, False)
    slow = ClientTiming(2.0, 2.0, 2.0, 6.0, 0, True)
    assert round_wall_seconds([fast, slow]) == 6.0
    assert round_wall_seconds([fast, slow], deadline_s=5.0) == 5.0
    assert round_wall_seconds([fast], deadline_s=5.0) == 3.0  # everyone done early: the round ends early
    assert round_wall_seconds([], deadline_s=5.0) == 0.0
    clock = SimClock()
    assert clock.advance(1, 5.0) == 5.0
    assert clock.advance(2, 3.0) == 8.0
    assert SimClock.from_state(json.loads(json.dumps(clock.state()))) == clock
    with pytest.raises(ValueError, match="rounds must increase"):
        clock.advance(2, 1.0)


def _calibration(**over):
    data = {"format": CALIBRATION_FORMAT, "num_items": 1682, "max_len": 50, "machine": {"cpu": "test"},
            "widths": [
                {"width": 16, "params": 27_000, "train_step_s": 0.030, "train_step_p90_s": 0.04,
                 "infer_top10_s": 0.002, "infer_top10_p99_s": 0.003, "infer_batch64_s": 0.02},
                {"width": 4, "params": 7_000, "train_step_s": 0.010, "train_step_p90_s": 0.012,
                 "infer_top10_s": 0.001, "infer_top10_p99_s": 0.002, "infer_batch64_s": 0.01}]}
    data.update(over)
    return data


def test_step_seconds_interpolates_in_width_and_refuses_outside(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_calibration()))
    cal = load_calibration(path)
    assert [w.width for w in cal.widths] == [4, 16]
    assert step_seconds(cal, 4) == 0.010 and step_seconds(cal, 16) == 0.030
    assert step_seconds(cal, 10) == pytest.approx(0.020)  # halfway between 4 and 16
    assert step_seconds(cal, 7) == pytest.approx(0.015)
    assert infer_seconds(cal, 10) == pytest.approx(0.0015)
    for bad in (2, 32):
        with pytest.raises(ValueError, match=f"width {bad} is outside the calibrated widths 4..16"):
            step_seconds(cal, bad)
    # a device twice as slow at every width has speed 0.5 against this reference
    slow = _calibration()
    for w in slow["widths"]:
        w["train_step_s"] *= 2
    assert relative_speed(cal, load_calibration(slow)) == pytest.approx(0.5)


@pytest.mark.parametrize("change, message", [
    ({"format": "other/1"}, "'format' is 'other/1'"),
    ({"num_items": 0}, "'num_items' must be an integer >= 1"),
    ({"widths": []}, "'widths' must be a non-empty list"),
])
def test_calibration_validation(change, message):
    with pytest.raises(ValueError, match=message):
        load_calibration(_calibration(**change))


def test_calibration_entries_are_validated(tmp_path):
    data = _calibration()
    del data["widths"][1]["infer_batch64_s"]
    with pytest.raises(ValueError, match="widths entry 2: missing infer_batch64_s"):
        load_calibration(data)
    data = _calibration()
    data["widths"][0]["train_step_s"] = -1
    with pytest.raises(ValueError, match=r"widths entry 1 \(width 16\): 'train_step_s' must be seconds > 0"):
        load_calibration(data)
    data = _calibration()
    data["widths"][1]["width"] = 16
    with pytest.raises(ValueError, match="measured twice"):
        load_calibration(data)
    with pytest.raises(ValueError, match="not found"):
        load_calibration(tmp_path / "nope.json")


def test_checked_in_calibration_reads_back():
    from pathlib import Path

    cal = load_calibration(Path(__file__).resolve().parents[1] / "docs" / "calibration.json")
    assert cal.num_items == 1682  # MovieLens-100k
    assert step_seconds(cal, 16) > 0


def test_calibrate_command_writes_a_profile_the_simulator_reads(tmp_path, capsys):
    from simulations.calibrate import main, parser

    out = tmp_path / "cal.json"
    assert main(["--widths", "8,4", "--num-items", "50", "--max-len", "10", "--repeats", "5",
                 "--infer-repeats", "10", "--warmup", "1", "--max-seconds", "0.2", "--out", str(out)]) == 0
    cal = load_calibration(out)
    assert [w.width for w in cal.widths] == [4, 8] and (cal.num_items, cal.max_len) == (50, 10)
    assert cal.raw["clock"] == "wall" and cal.raw["widths"][0]["train_step_s"] == cal.raw["widths"][0]["wall"][
        "train_step_s"]
    assert cal.raw["command"].startswith("python -m simulations.calibrate --widths 8,4")
    assert "| 4 | " in capsys.readouterr().out  # the markdown table
    text = parser().format_help()
    for action in parser()._actions:
        assert action.help, action.dest  # every option is explained
        assert any(opt in text for opt in action.option_strings)
