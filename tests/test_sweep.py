"""`fedkd sweep`: spec expansion, validation before anything runs, and resume after interrupts.

The fast tests inject a fake executor that writes what a finished run writes (config.json,
then summary.json), so the resume logic is tested without Flower. One slow test runs a
real two-run sweep through the CLI.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedkd.config import ExperimentConfig
from simulations import cli
from simulations.sweep import SpecError, describe, parse_set, plan, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GRID_SPEC = """
name = "grid"
seeds = [0, 1]
config-files = ["files/common.toml"]
metrics = ["test_ndcg@10", "teacher.best_epoch"]
[base]
num-rounds = 3
teacher-epochs = 2
[configs.a]
kd-weight = 1.0
teacher-epochs = 3
kd-temperature = 9.0
[configs.b]
kd-weight = 0.0
[grid]
kd-temperature = [1.0, 2.5]
quant-bits = [8, 32]
"""


@pytest.fixture
def grid_spec(tmp_path: Path) -> Path:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "common.toml").write_text("num-rounds = 4\nkd-top-k = 5\n")
    return _spec(tmp_path, GRID_SPEC)


def test_grid_crosses_named_configs_in_order_with_safe_names(grid_spec, tmp_path):
    sweep = plan(grid_spec, output_dir=tmp_path / "out", cwd=tmp_path)
    assert list(sweep.configs) == [
        "a-kd-temperature=1-quant-bits=8", "a-kd-temperature=1-quant-bits=32",
        "a-kd-temperature=2.5-quant-bits=8", "a-kd-temperature=2.5-quant-bits=32",
        "b-kd-temperature=1-quant-bits=8", "b-kd-temperature=1-quant-bits=32",
        "b-kd-temperature=2.5-quant-bits=8", "b-kd-temperature=2.5-quant-bits=32"]
    assert len(sweep.runs) == 16
    assert [r.name for r in sweep.runs[:9]] == [f"{c}-s0" for c in sweep.configs] + [
        "a-kd-temperature=1-quant-bits=8-s1"]  # seeds outermost
    assert sweep.dir == (tmp_path / "out" / "sweeps" / "grid").resolve()
    assert sweep.metrics == ["test_ndcg@10", "teacher.best_epoch"]


def test_merge_order_files_base_config_grid_sweep_then_set(grid_spec, tmp_path):
    sweep = plan(grid_spec, output_dir=tmp_path / "out", cwd=tmp_path, sets={"quant-bits": 4, "num-rounds": 6})
    run = next(r for r in sweep.runs if r.name == "a-kd-temperature=2.5-quant-bits=32-s1")
    cfg = run.resolved
    assert cfg["kd-top-k"] == 5  # only in the config file
    assert cfg["teacher-epochs"] == 3  # named config beats [base]
    assert cfg["kd-temperature"] == 2.5  # grid beats the named config
    assert cfg["kd-weight"] == 1.0
    assert cfg["quant-bits"] == 4 and cfg["num-rounds"] == 6  # --set beats grid, [base] and files
    assert cfg["seed"] == 1 and cfg["experiment-name"] == run.name and cfg["progress"] is False
    assert cfg["output-dir"] == str(sweep.dir / "runs")
    assert Path(cfg["cache-dir"]).is_absolute()  # as the run itself will record it
    assert cfg == ExperimentConfig.from_flat(run.overrides).to_flat()
    b = next(r for r in sweep.runs if r.config.startswith("b-"))
    assert b.resolved["teacher-epochs"] == 2 and b.resolved["kd-weight"] == 0.0


def test_seeds_option_replaces_the_specs(grid_spec, tmp_path):
    sweep = plan(grid_spec, seeds=[7], output_dir=tmp_path / "out", cwd=tmp_path)
    assert sweep.seeds == [7] and {r.seed for r in sweep.runs} == {7} and len(sweep.runs) == 8


def test_without_configs_there_is_one_named_base_and_output_dir_comes_from_base(tmp_path):
    spec = _spec(tmp_path, 'seeds = [0]\n[base]\noutput-dir = "elsewhere"\n[grid]\nkd-weight = [0.0, 0.5]\n')
    sweep = plan(spec, cwd=tmp_path)
    assert [r.name for r in sweep.runs] == ["base-kd-weight=0-s0", "base-kd-weight=0.5-s0"]
    assert sweep.dir == (tmp_path / "elsewhere" / "sweeps" / "spec").resolve()


@pytest.mark.parametrize(("text", "needles"), [
    ("seeds = [0]\nseed = 3\n", ["unknown spec key", "'seed'"]),
    ("seeds = [0]\n[configs.good]\nkd-weight = 1.0\n[configs.bad]\nkd-wieght = 0.5\n",
     ["config 'bad'", "Unknown config key 'kd-wieght'"]),
    ("seeds = [0]\n[configs.fedkd]\nkd-weight = 1.0\n[grid]\nquant-bits = [8, 7]\n",
     ["config 'fedkd-quant-bits=7'", "'quant-bits' has invalid value 7"]),
    ("seeds = [0]\n[base]\nnum-rounds = \"many\"\n", ["config 'base'", "'num-rounds' must be an integer"]),
    ("seeds = [0]\n[configs.x]\nseed = 4\n", ["[configs.x]", "'seed' is set by the sweep"]),
    ("seeds = [0]\n[grid]\nkd-weight = 0.5\n", ["'grid.kd-weight' must be a non-empty list"]),
    ("seeds = []\n", ["'seeds' must be a non-empty list"]),
    ("seeds = [0]\nconfig-files = [\"missing.toml\"]\n", ["missing.toml", "does not exist"]),
])
def test_bad_spec_fails_naming_what_is_wrong_and_writes_nothing(tmp_path, capsys, text, needles):
    spec = _spec(tmp_path, text)
    out = tmp_path / "out"
    with pytest.raises(SpecError) as err:
        plan(spec, output_dir=out, cwd=tmp_path)
    for needle in needles:
        assert needle in str(err.value)
    assert cli.main(["sweep", str(spec), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedkd: error: ") and all(n in err for n in needles)
    assert not out.exists()


def test_set_refuses_keys_the_sweep_sets(grid_spec, tmp_path):
    with pytest.raises(SpecError, match="'seed' is set by the sweep.*--seeds"):
        plan(grid_spec, cwd=tmp_path, sets={"seed": 3})


def test_set_values_are_read_as_toml_else_text():
    assert parse_set("kd-weight=0.5") == ("kd-weight", 0.5)
    assert parse_set("progress=true") == ("progress", True)
    assert parse_set("tier-names=a,b") == ("tier-names", "a,b")
    assert parse_set("data-path=/x/y.csv") == ("data-path", "/x/y.csv")


# --- running with a fake executor -------------------------------------------------------------
class FakeExecutor:
    """Writes what `fedkd run` writes: config.json first, summary.json last (only when it ends)."""

    def __init__(self, *, interrupt: set[str] = frozenset(), fail: set[str] = frozenset()) -> None:
        self.calls: list[str] = []
        self.interrupt = interrupt
        self.fail = fail

    def __call__(self, run) -> int:
        self.calls.append(run.name)
        assert run.toml.is_file()  # the run gets its settings from this file
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "config.json").write_text(json.dumps({"config": run.resolved, "python": "3"}))
        if run.name in self.interrupt:
            raise KeyboardInterrupt  # Ctrl-C in the middle of this run: no summary.json
        if run.name in self.fail:
            run.log.write_text("starting\nTraceback: boom\n")
            return 3
        (run.dir / "metrics.csv").write_text("round,val_hr,val_ndcg,cum_bytes\n1,0.2,0.1,1000\n")
        (run.dir / "summary.json").write_text(json.dumps({"test_ndcg@10": 0.1 + run.seed / 100,
                                                          "test_hr@10": 0.3}))
        return 0


@pytest.fixture
def four_runs(tmp_path: Path) -> Path:
    return _spec(tmp_path, "name = \"four\"\nseeds = [0, 1]\n[configs.kd]\nkd-weight = 1.0\n"
                           "[configs.avg]\nkd-weight = 0.0\n")


def _plan(spec: Path, tmp_path: Path):
    return plan(spec, output_dir=tmp_path / "out", cwd=tmp_path)


def test_interrupted_sweep_resumes_with_exactly_the_missing_runs(four_runs, tmp_path, capsys):
    sweep = _plan(four_runs, tmp_path)
    first = FakeExecutor(interrupt={"kd-s1"})  # the 3rd of 4 runs
    stopped = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, first, stop=lambda: stopped.append(True))
    assert first.calls == ["kd-s0", "avg-s0", "kd-s1"] and stopped == [True]
    assert json.loads((sweep.dir / "sweep.json").read_text())["runs"][0]["name"] == "kd-s0"
    assert capsys.readouterr().out.startswith("sweep four: 4 runs: 0 finished, 4 to run")

    second = FakeExecutor()
    assert run_sweep(_plan(four_runs, tmp_path), second) == []
    assert second.calls == ["kd-s1", "avg-s1"]  # the interrupted one (no summary.json) and the unstarted one
    out = capsys.readouterr().out
    assert "4 runs: 2 finished, 2 to run" in out and "[sweep] kd-s1:" in out and "test_ndcg@10 = 0.11" in out
    assert "(1/2 runs, about 0 min left)" in out and "(2/2 runs)" in out  # progress in a log without a bar

    third = FakeExecutor()
    assert run_sweep(_plan(four_runs, tmp_path), third) == [] and third.calls == []
    assert "4 runs: 4 finished, 0 to run" in capsys.readouterr().out


def test_a_run_interrupted_after_a_checkpoint_of_its_settings_is_resumed_not_restarted(four_runs, tmp_path, capsys):
    """A run with a checkpoint of exactly its settings goes on with ``--resume`` (its log appended);
    a checkpoint of other settings, or an unreadable one, starts the run afresh."""
    from fedkd import checkpoint
    from simulations.sweep import SubprocessExecutor

    sweep = _plan(four_runs, tmp_path)
    first = FakeExecutor(interrupt={"kd-s1"})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, first, stop=lambda: None)
    kd1, avg1 = (next(r for r in sweep.runs if r.name == n) for n in ("kd-s1", "avg-s1"))
    checkpoint.save(kd1.dir, {"round": 7, "config": kd1.resolved})  # as the round loop writes it
    avg1.dir.mkdir(parents=True)
    checkpoint.save(avg1.dir, {"round": 2, "config": {**avg1.resolved, "kd-weight": 0.5}})
    status, line = describe(_plan(four_runs, tmp_path))
    assert status["kd-s1"] == "to resume after round 7" and status["avg-s1"] == "to run"
    assert line == "4 runs: 2 finished, 2 to run (1 to resume from their checkpoints)"
    ex = SubprocessExecutor(num_cpus=1)
    assert ex.command(kd1)[-3:] == ["--num-cpus", "1", "--resume"]
    assert ex.command(avg1)[-2:] == ["--num-cpus", "1"]  # another experiment's checkpoint: afresh
    (kd1.dir / checkpoint.NAME).write_bytes(b"not a checkpoint")
    assert kd1.status() == "to run" and "--resume" not in ex.command(kd1)


def test_progress_estimates_what_is_left_from_the_mean_run():
    from simulations.sweep import _progress

    assert _progress(1, 10, [1800.0], jobs=1) == "1/10 runs, about 4.5 h left"
    assert _progress(2, 10, [600.0, 1200.0], jobs=2) == "2/10 runs, about 60 min left"
    assert _progress(10, 10, [5.0] * 10, jobs=1) == "10/10 runs"


def test_configs_option_runs_only_those_and_the_report_keeps_every_run(four_runs, tmp_path):
    from simulations.report import load_sweep

    run_sweep(plan(four_runs, output_dir=tmp_path / "out", cwd=tmp_path, seeds=[0]), FakeExecutor())
    extra = FakeExecutor()
    sweep = plan(four_runs, output_dir=tmp_path / "out", cwd=tmp_path, seeds=[1, 2], only=["kd"])
    assert [r.name for r in sweep.runs] == ["kd-s1", "kd-s2"]
    run_sweep(sweep, extra)
    assert extra.calls == ["kd-s1", "kd-s2"]
    written = json.loads((sweep.dir / "sweep.json").read_text())
    assert [r["name"] for r in written["runs"]] == ["kd-s0", "avg-s0", "kd-s1", "kd-s2"]
    assert written["seeds"] == [0, 1, 2]
    col = load_sweep(sweep.dir)
    assert {r.name: r.status for r in col.runs} == dict.fromkeys(["kd-s0", "kd-s1", "kd-s2", "avg-s0"], "finished")
    with pytest.raises(SpecError, match="--configs: nope not in .*its configs are kd, avg"):
        plan(four_runs, output_dir=tmp_path / "out", cwd=tmp_path, only=["nope"])


def test_edited_spec_reruns_only_the_configs_that_changed(four_runs, tmp_path):
    run_sweep(_plan(four_runs, tmp_path), FakeExecutor())
    four_runs.write_text(four_runs.read_text().replace("kd-weight = 1.0", "kd-weight = 0.5"))
    sweep = _plan(four_runs, tmp_path)
    status, line = describe(sweep)
    assert status == {"kd-s0": "stale", "avg-s0": "finished", "kd-s1": "stale", "avg-s1": "finished"}
    assert line.startswith("4 runs: 2 finished, 2 to run (2 stale")
    again = FakeExecutor()
    run_sweep(sweep, again)
    assert again.calls == ["kd-s0", "kd-s1"]


def test_set_on_the_command_line_also_makes_runs_stale(four_runs, tmp_path):
    run_sweep(_plan(four_runs, tmp_path), FakeExecutor())
    sweep = plan(four_runs, output_dir=tmp_path / "out", cwd=tmp_path, sets={"num-rounds": 2})
    assert set(describe(sweep)[0].values()) == {"stale"}


def test_folder_without_summary_is_rerun(four_runs, tmp_path):
    sweep = _plan(four_runs, tmp_path)
    run_sweep(sweep, FakeExecutor())
    (sweep.dir / "runs" / "avg-s1" / "summary.json").unlink()
    again = FakeExecutor()
    run_sweep(_plan(four_runs, tmp_path), again)
    assert again.calls == ["avg-s1"]


def test_failed_run_is_recorded_and_the_others_go_on(four_runs, tmp_path, capsys):
    sweep = _plan(four_runs, tmp_path)
    fake = FakeExecutor(fail={"avg-s0"})
    assert run_sweep(sweep, fake) == ["avg-s0"]
    assert fake.calls == ["kd-s0", "avg-s0", "kd-s1", "avg-s1"]
    records = [json.loads(line) for line in (sweep.dir / "failures.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["run"] == "avg-s0" and records[0]["returncode"] == 3
    assert records[0]["log_tail"][-1] == "Traceback: boom"
    assert "avg-s0: FAILED (exit 3)" in capsys.readouterr().out
    retry = FakeExecutor()
    run_sweep(_plan(four_runs, tmp_path), retry)
    assert retry.calls == ["avg-s0"]


def test_parallel_jobs_run_every_run_once(four_runs, tmp_path):
    fake = FakeExecutor()
    assert run_sweep(_plan(four_runs, tmp_path), fake, jobs=3) == []
    assert sorted(fake.calls) == ["avg-s0", "avg-s1", "kd-s0", "kd-s1"]
    assert set(describe(_plan(four_runs, tmp_path))[0].values()) == {"finished"}


def test_interrupt_with_parallel_jobs_stops_the_runs_in_flight(four_runs, tmp_path):
    stopped = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_plan(four_runs, tmp_path), FakeExecutor(interrupt={"kd-s0"}), jobs=2,
                  stop=lambda: stopped.append(True))
    assert stopped == [True]


def test_dry_run_lists_status_and_writes_nothing(four_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI resolves relative paths (cache-dir) from here, as _plan does
    sweep = _plan(four_runs, tmp_path)
    run_sweep(sweep, FakeExecutor(fail={"kd-s1"}))
    capsys.readouterr()
    before = sorted(p.name for p in (sweep.dir / "runs").iterdir())
    assert cli.main(["sweep", str(four_runs), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 3 finished, 1 to run" in out
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["kd-s0", "finished"], ["avg-s0", "finished"], ["kd-s1", "to", "run"], ["avg-s1", "finished"]]
    assert sorted(p.name for p in (sweep.dir / "runs").iterdir()) == before


def test_example_spec_plans_three_kd_weights_over_three_seeds(tmp_path):
    sweep = plan(ROOT / "simulations" / "sweeps" / "example-kd-weight.toml", output_dir=tmp_path, cwd=tmp_path)
    assert sorted({r.resolved["kd-weight"] for r in sweep.runs}) == [0.0, 0.5, 1.0]
    assert sweep.seeds == [0, 1, 2] and len(sweep.runs) == 9
    assert all(r.resolved["data-path"] == "" for r in sweep.runs)  # synthetic data


def test_help_documents_the_spec_and_options():
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "sweep", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120).stdout
    for option in ("--seeds", "--output-dir", "--set", "--jobs", "--dry-run", "[grid]", "[configs.",
                   "config-files", "metrics"):
        assert option in out, option


# --- a real sweep -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_sweep_runs_then_resumes_with_nothing_to_do(real_sweep):
    """``real_sweep`` (tests/conftest.py): two real runs, two named configs at seed 0, two at a
    time; the runs are also the naive-labels/local-DP and error-feedback experiments of the
    end-to-end tests."""
    proc = real_sweep.proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 runs: 0 finished, 2 to run" in proc.stdout
    sweep_dir = real_sweep.dir
    for run in ("naive-ldp-s0", "error-feedback-s0"):
        assert (sweep_dir / "runs" / run / "summary.json").is_file(), run
        assert (sweep_dir / "runs" / f"{run}.log").is_file()
    report = (sweep_dir / "report.md").read_text()
    assert "| naive-ldp | 1/1 |" in report and "| error-feedback | 1/1 |" in report
    assert "Missing runs: none." in report
    assert len((sweep_dir / "report.csv").read_text().splitlines()) == 3
    t0 = time.monotonic()
    again = subprocess.run(real_sweep.cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 runs: 2 finished, 0 to run" in again.stdout
    assert time.monotonic() - t0 < 30  # no simulation started


def test_a_knob_added_later_at_its_default_does_not_make_finished_runs_stale():
    from fedkd.config import ExperimentConfig
    from simulations.report import same_config

    now = ExperimentConfig().to_flat()
    before = {k: v for k, v in now.items() if k not in ("round-deadline", "student-widths")}  # an older fedkd
    assert same_config(before, now) and same_config(now, before)
    assert not same_config(before, {**now, "round-deadline": 1.0})  # a real difference still counts
    assert not same_config({**before, "seed": 3}, now)
    # the synthetic data's size (default 300 users until 2026-12-01, 100 since) under a data-path: unused
    ml = {"data-path": "/data/u.data"}
    assert same_config({**now, **ml, "synthetic-users": 300}, {**now, **ml})
    assert not same_config({**now, "synthetic-users": 300}, now)  # on synthetic data it is the data


def test_a_knob_whose_default_changed_later_counts_at_what_older_runs_did():
    """A run from before server-lr-schedule existed took constant steps: it is not the
    cosine default of today, and it is the same as a plan that asks for constant."""
    from fedkd.config import ExperimentConfig
    from simulations.report import same_config

    now = ExperimentConfig().to_flat()
    old = {k: v for k, v in now.items() if k != "server-lr-schedule"}
    assert now["server-lr-schedule"] == "cosine"
    assert not same_config(old, now)
    assert same_config(old, {**now, "server-lr-schedule": "constant"})
