"""simulations/keep_runs.py: a sweep's finished runs, kept small and read back by the reports."""

import json

import pytest

from simulations.keep_runs import keep, main
from simulations.report import include_runs, load_sweep


def _run(folder, name, *, finished=True, ndcg=0.2):
    d = folder / "runs" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": {"seed": int(name[-1])}}))
    (d / "metrics.csv").write_text("round,val_ndcg\n1,0.1\n")
    (d / "test_per_client.csv").write_text("partition_id,count,hr_sum,ndcg_sum\n3,1,1.0,0.5\n")
    (d / "checkpoint.pt").write_bytes(b"\0" * 1000)
    (d / "student.pt").write_bytes(b"\1" * 100)
    (d / "wire.jsonl").write_text("{}\n")
    if finished:
        (d / "summary.json").write_text(json.dumps({"test_ndcg@10": ndcg}))
    return d


def _sweep(tmp_path):
    sweep = tmp_path / "outputs" / "sweeps" / "fleet"
    runs = [{"name": f"{c}-s{s}", "config": c, "seed": s} for c in ("a", "b") for s in (0, 1)]
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "fleet", "metrics": ["test_ndcg@10"], "runs": runs}))
    _run(sweep, "a-s0", ndcg=0.25)
    _run(sweep, "a-s1", finished=False)  # still running
    _run(sweep, "b-s0")
    _run(sweep, "b-s0.old-20260101-000000")  # moved aside by a rerun
    return sweep


def test_keeps_the_finished_runs_report_files_and_leaves_models_and_logs(tmp_path):
    sweep, dest = _sweep(tmp_path), tmp_path / "docs" / "runs" / "fleet"
    assert keep(sweep, dest) == ["a-s0", "b-s0"]
    assert sorted(p.name for p in (dest / "runs").iterdir()) == ["a-s0", "b-s0"]
    assert sorted(p.name for p in (dest / "runs" / "a-s0").iterdir()) == [
        "config.json", "metrics.csv", "summary.json", "test_per_client.csv"]
    # the reports read the kept folder as they read the sweep
    kept = {r.name: (r.summary or {}).get("test_ndcg@10") for r in load_sweep(dest).runs}
    assert kept == {"a-s0": 0.25, "a-s1": None, "b-s0": 0.2, "b-s1": None}
    assert [r.name for r in include_runs([f"{dest}:a=no-protection"]) if r.summary] == ["no-protection-s0"]


def test_a_second_keep_copies_only_what_changed(tmp_path):
    sweep, dest = _sweep(tmp_path), tmp_path / "kept"
    keep(sweep, dest)
    assert keep(sweep, dest) == []
    (sweep / "runs" / "a-s1" / "summary.json").write_text(json.dumps({"test_ndcg@10": 0.3}))  # it finished
    (sweep / "runs" / "b-s0" / "summary.json").write_text(json.dumps({"test_ndcg@10": 0.4}))  # rerun
    assert keep(sweep, dest) == ["a-s1", "b-s0"]
    assert json.loads((dest / "runs" / "b-s0" / "summary.json").read_text()) == {"test_ndcg@10": 0.4}


def test_configs_limits_what_is_kept_and_a_wrong_folder_is_refused(tmp_path, capsys):
    sweep, dest = _sweep(tmp_path), tmp_path / "kept"
    assert main([str(sweep), str(dest), "--configs", "b", "--models"]) == 0
    assert "kept 1 new or changed run(s)" in capsys.readouterr().out
    assert [p.name for p in (dest / "runs").iterdir()] == ["b-s0"]
    assert (dest / "runs" / "b-s0" / "student.pt").read_bytes() == b"\1" * 100  # the model, with --models
    with pytest.raises(SystemExit, match="not a sweep folder"):
        keep(tmp_path / "docs", dest)
