"""`fedkd report`: mean ± sample sd over seeds, honest about missing runs, with plots."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations import cli
from simulations.report import aggregate, curves, load_sweep, lookup, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _run(root: Path, name: str, seed: int, *, finished: bool = True, config: dict | None = None) -> dict:
    """A results folder like `fedkd run` leaves: validation every 2nd round, summary only when done."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": config or {"seed": seed}}))
    ndcg = RNG.uniform(0.05, 0.2, size=4)
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "val_hr", "val_ndcg", "cum_bytes", "wall_s"])
        for t in range(1, 5):
            val = "" if t % 2 else ndcg[t - 1]
            w.writerow([t, val if val == "" else 2 * val, val, 1_000_000 * t + seed, t])
    summary = {"test_ndcg@10": float(RNG.uniform(0.05, 0.2)), "test_hr@10": float(RNG.uniform(0.2, 0.4)),
               "train_bytes_total": int(RNG.integers(10**6, 10**7)), "rounds": 4,
               "teacher": {"best_valid_ndcg": float(RNG.uniform(0.1, 0.3))}}
    if finished:
        (d / "summary.json").write_text(json.dumps(summary))
    return {"summary": summary, "ndcg": ndcg}


@pytest.fixture
def sweep_dir(tmp_path: Path) -> tuple[Path, dict]:
    """A: 3/3 seeds; B: seed 2 interrupted (no summary); C: only seed 0 ran."""
    runs_dir = tmp_path / "sw" / "runs"
    made = {}
    for config, seeds in (("A", [0, 1, 2]), ("B", [0, 1, 2]), ("C", [0])):
        for s in seeds:
            made[f"{config}-s{s}"] = _run(runs_dir, f"{config}-s{s}", s, finished=(config, s) != ("B", 2))
    spec = {"name": "sw", "seeds": [0, 1, 2], "metrics": ["test_ndcg@10", "teacher.best_valid_ndcg"],
            "configs": {"A": {}, "B": {}, "C": {}},
            "runs": [{"name": f"{c}-s{s}", "config": c, "seed": s} for s in (0, 1, 2) for c in "ABC"]}
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(spec))
    return tmp_path / "sw", made


def _values(made: dict, config: str, metric: str) -> list[float]:
    return [lookup(m["summary"], metric) for name, m in made.items()
            if name.startswith(f"{config}-") and name != "B-s2"]


def test_means_and_sample_stds_match_numpy(sweep_dir):
    folder, made = sweep_dir
    col = load_sweep(folder)
    metrics = ["test_ndcg@10", "teacher.best_valid_ndcg", "train_bytes_total"]
    rows = {r.config: r for r in aggregate(col.runs, metrics)}
    assert list(rows) == ["A", "B", "C"]
    for config, n in (("A", 3), ("B", 2)):
        for metric in metrics:
            values = _values(made, config, metric)
            stat = rows[config].stats[metric]
            assert stat.n == n == len(values)
            assert stat.mean == pytest.approx(np.mean(values))
            assert stat.std == pytest.approx(np.std(values, ddof=1))
    assert (rows["A"].done, rows["A"].expected, rows["A"].missing) == (3, 3, [])
    assert (rows["B"].done, rows["B"].expected, rows["B"].missing) == (2, 3, ["B-s2"])
    assert (rows["C"].done, rows["C"].expected, rows["C"].missing) == (1, 3, ["C-s1", "C-s2"])
    assert rows["C"].stats["test_ndcg@10"].std is None  # one seed: no spread
    table = markdown_table(list(rows.values()), ["test_ndcg@10"])
    c = rows["C"].stats["test_ndcg@10"].mean
    assert f"| C | 1/3 | {c:.4f} ± n/a |" in table


def test_report_files_agree_with_the_summaries(sweep_dir):
    folder, made = sweep_dir
    written = write_report(folder, command="fedkd report sw")
    for name in ("report.md", "report.csv", "report_summary.csv", "curves_vs_round.png",
                 "curves_vs_bytes.png", "bars.png"):
        assert folder / name in written and (folder / name).stat().st_size > 0, name
    summary = {(r["config"], r["metric"]): r for r in csv.DictReader((folder / "report_summary.csv").open())}
    for config in ("A", "B"):
        for metric in ("test_ndcg@10", "teacher.best_valid_ndcg"):
            row, values = summary[(config, metric)], _values(made, config, metric)
            assert float(row["mean"]) == pytest.approx(np.mean(values))
            assert float(row["std"]) == pytest.approx(np.std(values, ddof=1))
            assert int(row["n"]) == len(values)
    assert summary[("C", "test_ndcg@10")]["std"] == "" and summary[("C", "test_ndcg@10")]["seeds_expected"] == "3"
    per_run = list(csv.DictReader((folder / "report.csv").open()))
    assert len(per_run) == 9
    b2 = next(r for r in per_run if r["run"] == "B-s2")
    assert b2["status"] == "to run" and b2["test_ndcg@10"] == ""
    a1 = next(r for r in per_run if r["run"] == "A-s1")
    assert float(a1["teacher.best_valid_ndcg"]) == made["A-s1"]["summary"]["teacher"]["best_valid_ndcg"]
    md = (folder / "report.md").read_text()
    assert "Produced by: `fedkd report sw`" in md
    assert "| A | 3/3 |" in md and "| B | 2/3 |" in md and "| C | 1/3 |" in md
    assert "`B-s2` (not finished)" in md and "`C-s1` (not finished)" in md and "`C-s2` (not finished)" in md
    assert "teacher.best_valid_ndcg" in md and "6/9 runs finished" in md


def test_curves_average_seeds_on_validated_rounds_only(sweep_dir):
    folder, made = sweep_dir
    col = load_sweep(folder)
    xs, mean, std = curves(col.runs, "val_ndcg", "round")["A"]
    per_seed = np.array([made[f"A-s{s}"]["ndcg"][[1, 3]] for s in range(3)])
    assert list(xs) == [2, 4]  # rounds 1 and 3 had no validation
    assert mean == pytest.approx(per_seed.mean(axis=0))
    assert std == pytest.approx(per_seed.std(axis=0, ddof=1))
    mb, _, _ = curves(col.runs, "val_ndcg", "cum_bytes")["A"]
    assert mb == pytest.approx([2.000001, 4.000001])  # MB, averaged over seeds (seed s adds s bytes)
    assert list(curves(col.runs, "val_ndcg", "round")["C"][2]) == [0, 0]  # one seed: no band


def test_stale_run_counts_as_missing(tmp_path):
    runs_dir = tmp_path / "sw" / "runs"
    _run(runs_dir, "A-s0", 0, config={"seed": 0, "kd-weight": 1.0})
    _run(runs_dir, "A-s1", 1, config={"seed": 1, "kd-weight": 0.5})  # ran before the spec was edited
    spec = {"name": "sw", "seeds": [0, 1], "metrics": ["test_ndcg@10"], "configs": {"A": {}},
            "runs": [{"name": f"A-s{s}", "config": "A", "seed": s, "resolved": {"seed": s, "kd-weight": 1.0}}
                     for s in (0, 1)]}
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(spec))
    write_report(tmp_path / "sw")
    md = (tmp_path / "sw" / "report.md").read_text()
    assert "| A | 1/2 |" in md and "`A-s1` (stale" in md


def test_folder_of_runs_without_sweep_json_groups_by_name(tmp_path):
    made = {n: _run(tmp_path, n, s) for n, s in (("x-s0", 0), ("x-s1", 1), ("y-s0", 0), ("single", 0))}
    (tmp_path / "x-s0.old-20250101-000000").mkdir()  # moved-aside results are not runs
    rows = {r.config: r for r in aggregate(load_sweep(tmp_path).runs, ["test_hr@10"])}
    assert list(rows) == ["single", "x", "y"]
    assert (rows["x"].done, rows["x"].expected) == (2, 2)
    assert (rows["y"].done, rows["y"].expected, rows["y"].missing) == (1, 2, ["y-s1"])
    assert (rows["single"].done, rows["single"].expected) == (1, 1)
    assert rows["x"].stats["test_hr@10"].mean == pytest.approx(
        np.mean([made["x-s0"]["summary"]["test_hr@10"], made["x-s1"]["summary"]["test_hr@10"]]))


def test_unknown_metric_is_reported_as_absent(sweep_dir):
    folder, _ = sweep_dir
    write_report(folder, metrics=["test_ndcg@20"])
    md = (folder / "report.md").read_text()
    assert "| A | 3/3 | n/a |" in md and "Not in any summary: test_ndcg@20" in md and "test_ndcg@10" in md


def test_lookup_reaches_nested_keys_and_refuses_non_numbers():
    s = {"a": 1, "t": {"b": {"c": 2.5}, "name": "x"}, "flag": True}
    assert lookup(s, "a") == 1.0 and lookup(s, "t.b.c") == 2.5
    assert lookup(s, "t.name") is None and lookup(s, "flag") is None and lookup(s, "t.zz") is None


def test_cli_report_with_options(sweep_dir, capsys):
    folder, _ = sweep_dir
    assert cli.main(["report", str(folder), "--metrics", "test_hr@10", "--x", "round"]) == 0
    md = (folder / "report.md").read_text()
    assert f"Produced by: `fedkd report {folder} --metrics test_hr@10 --x round`" in md
    assert "| config | seeds done | test_hr@10 |" in md
    assert (folder / "curves_vs_round.png").is_file() and not (folder / "curves_vs_bytes.png").exists()
    assert "wrote:" in capsys.readouterr().out


def test_cli_report_on_a_missing_folder_fails_cleanly(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_help_mentions_the_options():
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "report", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120).stdout
    for option in ("--metrics", "--curve", "--x", "cum_bytes", "SWEEP_DIR", "sweep.json"):
        assert option in out, option
