"""Session-wide real runs shared between test modules (tests/e2e_runs.py says why).

``golden[name]`` is the golden case ``name`` (tests/test_golden.py), run once per session on
first use. Tests read these folders and never write into them: a test that must change a run
(export it, run it again over it) works on a copy.

The suite runs in three pytest-xdist workers (``-n 3`` in pyproject.toml): an end-to-end run
spends much of its wall time waiting (Python and Ray starting, Flower's polling), so one
stream of tests kept the 2 cores about 40% busy, and two about 60% (docs/performance.md). The
shared runs are still made once per session, not once per worker: ``Once`` keeps each in a
folder every worker sees, behind a file lock (the recipe of pytest-xdist's documentation), and
a worker that needs a run another worker is making waits for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from filelock import FileLock

from e2e_runs import BASE, CASES, ONE_THREAD, ROOT, SMALL_SIM, Run, kill_after_round_2, run_case


class Once:
    """Named runs made once per test session across xdist workers: the first worker to ask
    makes the run under the name's lock and records it (or its failure) in ``<name>.json``;
    every later ask, in any worker, reads the record. A run that failed once fails every test
    that needs it, and is not made again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def record(self, name: str, make: Callable[[], dict]) -> dict:
        """The JSON record of the run ``name``, made by ``make`` if no worker has yet."""
        record = self.root / f"{name}.json"
        with FileLock(str(self.root / f"{name}.lock")):
            if not record.exists():
                try:
                    record.write_text(json.dumps(make()))
                except RuntimeError as exc:
                    record.write_text(json.dumps({"error": str(exc)}))
        got = json.loads(record.read_text())
        if "error" in got:
            raise RuntimeError(got["error"])
        return got

    def run(self, name: str, make: Callable[[], Run]) -> Run:
        """``record`` for a run through the CLI (``e2e_runs.Run``)."""
        def made() -> dict:
            run = make()
            return {"out": str(run.out), "stdout": run.stdout, "stderr": run.stderr}
        got = self.record(name, made)
        return Run(Path(got["out"]), got["stdout"], got["stderr"])


@pytest.fixture(scope="session")
def once(tmp_path_factory) -> Once:
    """Under xdist each worker has its own base temporary folder inside the session's; the
    shared runs live in the session's, which every worker sees."""
    base = tmp_path_factory.getbasetemp()
    return Once((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-runs")


class GoldenRuns:
    """The golden cases, all in one output folder with one teacher cache, each made once per
    session (``Once``); two cases may run at the same time, in two workers.

    The default case always runs first, into the empty cache, so its teacher is trained
    (test_e2e checks ``teacher.cached`` is false there) and every other case loads it: the
    order in which the golden fixtures were written.
    """

    def __init__(self, once: Once) -> None:
        self.once = once
        base = once.root / "golden"
        self.out, self.cache = base / "out", base / "cache"

    def __getitem__(self, name: str) -> Run:
        for case in dict.fromkeys(["default", name]):
            got = self.once.run(f"golden-{case}", lambda case=case: run_case(case, self.out, self.cache))
        return got

    def teacher_copy(self, dest: Path) -> Path:
        """``dest``, holding a copy of the teachers the golden runs trained so far (the default
        case's at least, which this makes first if no test has yet): a run of its own on BASE's
        data (50 users, 80 items, seed 0, 2 teacher epochs) then loads the teacher instead of
        training the same one again. The run may write into its copy, never here."""
        self["default"]
        return copy_teachers(self.cache, dest)


@pytest.fixture(scope="session")
def golden(once) -> GoldenRuns:
    return GoldenRuns(once)


def _rerun(golden: GoldenRuns, once: Once, name: str) -> Run:
    """The golden case ``name`` run a second time, with the golden teacher cache, into an output
    folder that already holds a copy of the first run, SIGKILLed (with its Ray processes) once
    round 2 is written and then resumed (``--resume``)."""
    def make() -> Run:
        first = golden[name]
        out = once.root / f"rerun-{name}"
        shutil.copytree(first.out, out / name)
        flat = {**BASE, **CASES[name]}
        kill_after_round_2(out, golden.cache, name, flat)
        return run_case(name, out, golden.cache, flat={**flat, "resume": True})
    return once.run(f"rerun-{name}", make)


@pytest.fixture(scope="session")
def dp_rerun(golden, once) -> Run:
    """The central-DP case again (``_rerun``): one run for three claims, that a DP run killed
    mid-run resumes to the uninterrupted epsilon and metrics (test_reliability_e2e), that the
    same seed gives the same results, and that a second run loads the cached teacher and moves
    the earlier results aside instead of overwriting them (test_e2e)."""
    return _rerun(golden, once, "central-dp")


@pytest.fixture(scope="session")
def faults_rerun(golden, once) -> Run:
    """The faults case again (``_rerun``): a run with rejections resumes to the uninterrupted
    metrics, each rejection once (test_reliability_e2e, an extended test)."""
    return _rerun(golden, once, "faults-norm-bound")


@pytest.fixture(scope="session")
def small_sim(once) -> Run:
    """``SMALL_SIM`` through `fedkd run` (one torch thread, a teacher cache of its own, trained
    here): the run that `flwr run .` (test_flwr_run), a two-node Ray cluster (test_cluster) and
    the Deployment Engine (test_deploy) must each reproduce."""
    root = once.root / "small"
    return once.run("small-sim", lambda: run_case("small", root / "out", root / "cache", flat=SMALL_SIM,
                                                   env=ONE_THREAD))


def small_teacher(small_sim: Run, dest: Path) -> Path:
    """``dest``, holding a copy of ``small_sim``'s teacher (its cache lies beside its ``out``)."""
    return copy_teachers(small_sim.out.parents[1] / "cache", dest)


def copy_teachers(cache: Path, dest: Path) -> Path:
    """``dest``, holding a copy of the teachers in ``cache``: a run given ``dest`` as its cache
    loads them instead of training them again, and may write into its copy, never into ``cache``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in cache.glob("teacher-*.pt"):
        shutil.copy2(f, dest / f.name)
    return dest


@pytest.fixture
def teacher_cache(golden, tmp_path) -> Path:
    """A test's own teacher cache, with the golden runs' teachers in it (GoldenRuns.teacher_copy)."""
    return golden.teacher_copy(tmp_path / "teacher-cache")


# The real sweep's two configs (each over BASE's data and server settings), 2 and 3 rounds:
# plain federated distillation's float32 soft labels with local DP on; and 4-bit uploads with
# error feedback, half of each update sent (sparse), 8-bit downloads and cached soft labels sent
# as row numbers after round 1.
NAIVE_LDP = {"soft-label-format": "full", "dp-mode": "local", "dp-noise-multiplier": 0.5, "dp-clip-norm": 0.5}
ERROR_FEEDBACK = {"num-rounds": 3, "quant-bits": 4, "down-bits": 8, "error-feedback": True, "update-density": 0.5,
                  "kd-cache": True, "proxy-size": 64, "proxy-batch": 64}


def _toml(flat: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in flat.items())


@pytest.fixture(scope="session")
def real_sweep(golden, once) -> SimpleNamespace:
    """A real `fedkd sweep` of two configs at seed 0, the two runs side by side (``--jobs 2``,
    one worker each): one sweep for claims that do not touch each other. test_sweep: a sweep
    runs every run, reports, and resumes with nothing to do. Its ``naive-ldp`` run
    (``naive_labels_local_dp``): test_e2e_communication, the bytes of the labels sent down;
    test_privacy_e2e, the accounting of the noised updates sent up. Its ``error-feedback`` run
    (``error_feedback_run``): test_e2e_communication, what the devices keep and the bytes."""
    tmp = once.root / "sweep"
    cmd = [sys.executable, "-m", "simulations.cli", "sweep", str(tmp / "spec.toml"), "--output-dir", str(tmp / "out"),
           "--jobs", "2"]

    def make() -> dict:
        cache = golden.teacher_copy(tmp / "cache")
        base = {k: v for k, v in BASE.items() if k != "progress"}
        (tmp / "spec.toml").write_text(
            f'name = "tiny"\nseeds = [0]\n[base]\n{_toml(base)}cache-dir = "{cache}"\n'
            f"[configs.naive-ldp]\n{_toml(NAIVE_LDP)}[configs.error-feedback]\n{_toml(ERROR_FEEDBACK)}")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    proc = subprocess.CompletedProcess(cmd, **once.record("sweep", make))
    return SimpleNamespace(cmd=cmd, proc=proc, dir=tmp / "out" / "sweeps" / "tiny")


def _sweep_run(real_sweep: SimpleNamespace, run: str) -> Run:
    proc = real_sweep.proc
    if proc.returncode != 0:
        raise RuntimeError(f"the sweep failed: {proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return Run(real_sweep.dir / "runs" / run, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def naive_labels_local_dp(real_sweep) -> Run:
    """BASE + NAIVE_LDP, 2 rounds: a run of ``real_sweep``."""
    return _sweep_run(real_sweep, "naive-ldp-s0")


@pytest.fixture(scope="session")
def error_feedback_run(real_sweep) -> Run:
    """BASE + ERROR_FEEDBACK, 3 rounds: a run of ``real_sweep``."""
    return _sweep_run(real_sweep, "error-feedback-s0")


SHARED_RUNS = {"golden", "small_sim", "dp_rerun", "faults_rerun", "real_sweep", "naive_labels_local_dp",
               "error_feedback_run", "teacher_cache"}


# The heavy files in the order the workers take them: the golden cases first, from t = 0 (their
# default case trains the teacher almost every other run loads, so a worker that needs it early
# would wait), the runs that need no golden teacher (the small experiment's engines) on the
# other worker meanwhile, then the rest. Files not named follow in their usual order.
_HEAVY_ORDER = {name: i for i, name in enumerate([
    "test_golden.py", "test_deploy.py", "test_flwr_run.py", "test_e2e_communication.py", "test_e2e.py",
    "test_privacy_e2e.py", "test_reliability_e2e.py"])}


def pytest_collection_modifyitems(config, items):
    """Test files with real runs first (a slow test, or one that needs a shared run), the rest in
    their usual order after them: pytest-xdist hands out whole files in this order
    (``--dist loadfile --no-loadscope-reorder``), so both workers start on the long runs at once
    and the short unit tests fill in at the end, instead of one worker finishing the
    longest file alone."""
    heavy = {item.path for item in items
             if item.get_closest_marker("slow") or SHARED_RUNS & set(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: (item.path not in heavy, _HEAVY_ORDER.get(item.path.name, len(_HEAVY_ORDER))))
