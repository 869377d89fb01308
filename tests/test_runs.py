"""simulations/runs.py: the one reader of a run's results folder."""

import json

import pytest

from simulations.runs import UserScore, load_run, load_runs, split_seed


def _folder(path, *, summary=True, metrics="round,val_ndcg,cum_bytes,model_digest\n1,,100,0123\n2,0.25,200,ab12\n"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"config": {"seed": 3, "kd-weight": 1.0}, "python": "3"}))
    if metrics is not None:
        (path / "metrics.csv").write_text(metrics)
    if summary:
        (path / "summary.json").write_text(json.dumps({"test_ndcg@10": 0.2, "rounds": 2}))
    return path


def test_a_finished_run_reads_its_three_files(tmp_path):
    run = load_run(_folder(tmp_path / "kd-s3"))
    assert run.name == "kd-s3" and run.finished
    assert run.config == {"seed": 3, "kd-weight": 1.0}
    assert run.summary == {"test_ndcg@10": 0.2, "rounds": 2}
    assert run.rows == [{"round": 1.0, "val_ndcg": "", "cum_bytes": 100.0, "model_digest": "0123"},
                        {"round": 2.0, "val_ndcg": 0.25, "cum_bytes": 200.0, "model_digest": "ab12"}]


def test_an_unfinished_run_has_no_summary_and_may_lack_metrics(tmp_path):
    run = load_run(_folder(tmp_path / "kd-s0", summary=False, metrics=None))
    assert not run.finished and run.summary is None and run.rows == []
    assert run.config["seed"] == 3
    missing = load_run(tmp_path / "never-started")  # a planned run: nothing is read until asked
    assert not missing.finished and missing.summary is None
    with pytest.raises(OSError):
        missing.config


def test_per_user_scores_of_a_per_client_test_file(tmp_path):
    run = load_run(_folder(tmp_path / "r"))
    (run.path / "test_per_client.csv").write_text(
        "partition_id,tier,width,count,hr_sum,ndcg_sum\n4,1,8,2,1.0,0.5\n7,0,4,0,0.0,0.0\n")
    (run.path / "old.csv").write_text("partition_id,count,hr_sum,ndcg_sum\n4,1,1.0,0.3\n")  # before tiers
    assert run.per_user() == {4: UserScore(1, 0.25), 7: UserScore(0, 0.0)}
    assert run.user_ndcg() == {4: 0.25, 7: 0.0}
    assert run.per_user("old.csv") == {4: UserScore(None, 0.3)}


def test_load_runs_takes_a_sweeps_runs_folder_or_any_folder_of_runs(tmp_path):
    for name in ("b-s1", "a-s0", "a-s0.old-20250101-000000"):
        _folder(tmp_path / "sweep" / "runs" / name)
    (tmp_path / "sweep" / "runs" / "logs").mkdir()  # not a results folder
    (tmp_path / "sweep" / "runs" / "a-s0.toml").write_text("")
    assert [r.name for r in load_runs(tmp_path / "sweep")] == ["a-s0", "b-s1"]
    _folder(tmp_path / "plain" / "x", summary=False)
    assert [r.name for r in load_runs(tmp_path / "plain")] == ["x"]


def test_split_seed():
    assert split_seed("fedkd-8-s2") == ("fedkd-8", 2)
    assert split_seed("a-s1-s20") == ("a-s1", 20)
    assert split_seed("single") == ("single", None) and split_seed("x-s") == ("x-s", None)
