"""Session-wide real runs shared between test modules (tests/e2e_runs.py says why).

``golden[name]`` is the golden case ``name`` (tests/test_golden.py), run once per session on
first use. Tests read these folders and never write into them: a test that must change a run
(export it, run it again over it) works on a copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from e2e_runs import BASE, CASES, ROOT, Run, kill_after_round_2, run_case


class GoldenRuns:
    """The golden cases, all in one output folder with one teacher cache.

    The default case always runs first, into the empty cache, so its teacher is trained
    (test_e2e checks ``teacher.cached`` is false there) and every other case loads it: the
    order in which the golden fixtures were written.
    """

    def __init__(self, base: Path) -> None:
        self.out, self.cache = base / "out", base / "cache"
        self._runs: dict[str, Run | Exception] = {}

    def __getitem__(self, name: str) -> Run:
        for case in dict.fromkeys(["default", name]):
            if case not in self._runs:
                try:
                    self._runs[case] = run_case(case, self.out, self.cache)
                except RuntimeError as exc:  # failed once: every test that needs it fails, none reruns it
                    self._runs[case] = exc
        got = self._runs[name]
        if isinstance(got, Exception):
            raise got
        return got

    def teacher_copy(self, dest: Path) -> Path:
        """``dest``, holding a copy of the teachers the golden runs trained so far: a run of its
        own on BASE's data (50 users, 80 items, seed 0, 2 teacher epochs) then loads the
        teacher instead of training the same one again. In a whole-suite run the golden
        default case has run by then; a test run alone may find nothing to copy, and its run
        trains its own teacher, as before. The run may write into its copy, never here."""
        dest.mkdir(parents=True, exist_ok=True)
        if self.cache.is_dir():
            for f in self.cache.glob("teacher-*.pt"):
                shutil.copy2(f, dest / f.name)
        return dest


@pytest.fixture(scope="session")
def golden(tmp_path_factory) -> GoldenRuns:
    return GoldenRuns(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="session")
def faults_rerun(golden, tmp_path_factory) -> Run:
    """The faults case run a second time, with the golden teacher cache, into an output folder
    that already holds a copy of the first run, SIGKILLed (with its Ray processes) once round 2
    is written and then resumed (``--resume``): one run for three claims, that a run killed mid
    round resumes to the uninterrupted metrics (test_reliability_e2e), that the same seed gives
    the same results (the same test module), and that a second run loads the cached teacher and
    moves the earlier results aside instead of overwriting them (test_e2e)."""
    first = golden["faults-norm-bound"]
    name = first.out.name
    out = tmp_path_factory.mktemp("rerun")
    shutil.copytree(first.out, out / name)
    flat = {**BASE, **CASES[name]}
    kill_after_round_2(out, golden.cache, name, flat)
    return run_case(name, out, golden.cache, flat={**flat, "resume": True})


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
def real_sweep(golden, tmp_path_factory) -> SimpleNamespace:
    """A real `fedkd sweep` of two configs at seed 0, the two runs side by side (``--jobs 2``,
    one worker each): one sweep for claims that do not touch each other. test_sweep: a sweep
    runs every run, reports, and resumes with nothing to do. Its ``naive-ldp`` run
    (``naive_labels_local_dp``): test_e2e_communication, the bytes of the labels sent down;
    test_privacy_e2e, the accounting of the noised updates sent up. Its ``error-feedback`` run
    (``error_feedback_run``): test_e2e_communication, what the devices keep and the bytes."""
    tmp = tmp_path_factory.mktemp("sweep")
    cache = golden.teacher_copy(tmp / "cache")
    base = {k: v for k, v in BASE.items() if k != "progress"}
    spec = tmp / "spec.toml"
    spec.write_text(f'name = "tiny"\nseeds = [0]\n[base]\n{_toml(base)}cache-dir = "{cache}"\n'
                    f"[configs.naive-ldp]\n{_toml(NAIVE_LDP)}[configs.error-feedback]\n{_toml(ERROR_FEEDBACK)}")
    cmd = [sys.executable, "-m", "simulations.cli", "sweep", str(spec), "--output-dir", str(tmp / "out"),
           "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
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
