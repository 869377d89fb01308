"""The budgets report's arithmetic on hand-made run folders (the real sweep is in docs/budgets.md)."""

import csv
import json

import numpy as np
from simulations import budgets_report as br

TIERS = "weak,mid,strong"


def _run(folder, name, per_user, *, deadline=1.0, widths="4,8,16", stragglers=0, val=(0.01, 0.02, 0.04),
         full=None):
    d = folder / "runs" / name
    d.mkdir(parents=True)
    tiers = {t: {"test_ndcg@10": 0.0, "participants": 3, "aggregated": 2, "stragglers": 1} for t in TIERS.split(",")}
    (d / "summary.json").write_text(json.dumps({"test_ndcg@10": 0.05, "tiers": tiers, "sim_time_s": 3.0,
                                                "stragglers_total": stragglers}))
    (d / "config.json").write_text(json.dumps({"config": {"tier-names": TIERS, "round-deadline": deadline,
                                                          "student-widths": widths, "student-dim": 16,
                                                          "selection": "uniform"}}))
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "val_ndcg", "sim_time_s", "steps_mean_weak"])
        for r, v in enumerate(val, 1):
            w.writerow([r, v, r * 1.5, "nan" if r == 1 else 3 * deadline])  # round 1: no weak device trained
    for fname, rows in (("test_per_client.csv", per_user), ("test_per_client_full_width.csv", full)):
        if rows is None:
            continue
        with (d / fname).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["partition_id", "tier", "width", "count", "hr_sum", "ndcg_sum"])
            for pid, (tier, ndcg) in rows.items():
                w.writerow([pid, tier, 4, 1, float(ndcg > 0), ndcg])


def test_time_to_target_is_the_first_round_reaching_it():
    rows = [{"val_ndcg": "0.01", "sim_time_s": "1"}, {"val_ndcg": "", "sim_time_s": "2"},
            {"val_ndcg": "0.03", "sim_time_s": "3"}, {"val_ndcg": "0.05", "sim_time_s": "4"}]
    assert br.time_to_target(rows, 0.03) == 3.0
    assert br.time_to_target(rows, 0.06) is None


def test_comparisons_pair_the_same_users_of_each_tier(tmp_path):
    rng = np.random.default_rng(0)
    ref = {u: (u % 3, float(rng.random())) for u in range(60)}
    better = {u: (t, v + 0.1 if t == 0 else v) for u, (t, v) in ref.items()}  # only the weak tier gains
    _run(tmp_path, "nested-s0", better, full=better)
    _run(tmp_path, "drop-weak-s0", ref)
    runs = br.load(tmp_path)
    table = br.comparison_table(runs)
    rows = [r for r in table.splitlines() if r.startswith("| nested, full student vs drop-weak")]
    assert [r.split("|")[2].strip() for r in rows] == ["weak", "mid", "strong"]
    weak, mid = rows[0].split("|"), rows[1].split("|")
    assert weak[3].strip() == "0" and weak[4].strip() == "20"
    assert weak[7].strip().startswith("+0.1000 [+0.1000, +0.1000]")  # a constant shift has no spread
    assert mid[7].strip().startswith("+0.0000")
    assert "all-strong" not in table  # a missing reference run is left out, not invented

    _run(tmp_path, "nested-s1", better, full=better)  # a second seed pools, paired within its seed
    _run(tmp_path, "drop-weak-s1", {u: (t, v - 0.1) for u, (t, v) in ref.items()})
    weak = br.comparison_table(br.load(tmp_path)).splitlines()[2].split("|")
    assert weak[3].strip() == "0,1" and weak[4].strip() == "40"
    assert weak[7].strip().startswith("+0.1500")


def test_fleet_table_and_deadline_plot(tmp_path):
    users = {u: (u % 3, 0.1) for u in range(9)}
    _run(tmp_path, "nested-s0", users, deadline=1.0)
    _run(tmp_path, "deadline-0.5-s0", users, deadline=0.5, stragglers=7, val=(0.01, 0.02, 0.025))
    runs = br.load(tmp_path)
    table = br.fleet_table(runs, target=0.03)
    assert "| nested-s0 | 1 | 4,8,16 |" in table and table.count("3/2/1") == 6
    assert table.splitlines()[2].endswith("| never |")  # deadline-0.5 never reaches 0.03
    assert table.splitlines()[3].endswith("| 4.5 |")    # nested reaches 0.04 in round 3
    points = br.deadline_plot(runs, tmp_path / "plot.png")
    assert [(p["deadline"], p["stragglers"], p["weak_steps"]) for p in points] == [(0.5, 7, 1.0), (1.0, 0, 2.0)]  # round 1 counts as 0 steps
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_no_finished_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert br.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err

