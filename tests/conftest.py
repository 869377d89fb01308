"""Session-wide real runs shared between test modules (tests/e2e_runs.py says why).

``golden[name]`` is the golden case ``name`` (tests/test_golden.py), run once per session on
first use. Tests read these folders and never write into them: a test that must change a run
(export it, run it again over it) works on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from e2e_runs import BASE, Run, run_case


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


@pytest.fixture(scope="session")
def golden(tmp_path_factory) -> GoldenRuns:
    return GoldenRuns(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="session")
def faults_rerun(golden, tmp_path_factory) -> Run:
    """The faults case run a second time, with the golden teacher cache, into an output folder
    that already holds a copy of the first run: one run for two claims, that the same seed
    gives the same results (test_reliability_e2e) and that a second run loads the cached
    teacher and moves the earlier results aside instead of overwriting them (test_e2e)."""
    first = golden["faults-norm-bound"]
    out = tmp_path_factory.mktemp("rerun")
    shutil.copytree(first.out, out / first.out.name)
    return run_case(first.out.name, out, golden.cache)


@pytest.fixture(scope="session")
def naive_labels_local_dp(tmp_path_factory) -> Run:
    """Plain federated distillation's float32 soft labels with local DP on, 2 rounds: one run for
    two claims that do not touch each other (test_e2e_communication: the bytes of the labels
    sent down; test_privacy_e2e: the accounting of the noised updates sent up)."""
    base = tmp_path_factory.mktemp("naive-ldp")
    flat = {**BASE, "soft-label-format": "full", "dp-mode": "local", "dp-noise-multiplier": 0.5, "dp-clip-norm": 0.5}
    return run_case("naive-ldp", base / "out", base / "cache", flat=flat)
