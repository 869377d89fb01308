"""Golden runs: what the round loop computes, pinned byte for byte before the server is redesigned.

Six short real Flower simulations (the CLI in a subprocess, Ray included) cover every path
through the round loop: the default synthetic experiment, nested widths under a deadline,
secure aggregation, the logit protocol with teacher refinement, injected faults with norm
bounding, and central differential privacy. For each, ``metrics.csv`` (every column: wall
times live in ``timing.csv``) and the test metrics of ``summary.json`` must equal the files
under ``tests/golden/``. A change that moves any of them is either a bug or a behaviour
change that the changelog must name, with the fixtures rewritten by::

    python tests/test_golden.py --write        # all cases; or name some: ... --write dp
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden")
BASE = {"synthetic-users": 50, "synthetic-items": 80, "num-rounds": 2, "teacher-epochs": 2, "progress": False}
CASES: dict[str, dict] = {
    "default": {},
    "nested-deadline": {"student-widths": "4,16", "tier-memory-mb": "0.03,1", "tier-speed": "0.1,1",
                        "tier-steps": "16,16", "round-deadline": 0.6, "min-steps": 2},
    "secagg": {"secure-aggregation": True, "clients-per-round": 10},
    "logits-refine": {"protocol": "logits", "teacher-refine-steps": 20, "teacher-refine-lr": 0.01,
                      "num-rounds": 3},
    "faults-norm-bound": {"fault-crash": 0.2, "fault-corrupt": 0.15, "fault-malicious": "3", "norm-bound": 3.0,
                          "num-rounds": 3},
    "central-dp": {"dp-mode": "central", "dp-noise-multiplier": 1.0, "dp-clip-norm": 0.5,
                   "clients-per-round": 10, "num-rounds": 3},
}
# summary.json keys that are results of the run (not wall times, paths or the teacher's cache state)
PINNED_SUMMARY = ("best_round", "best_val_ndcg", "test_hr@10", "test_ndcg@10", "test_users",
                  "test_hr@10_full_width", "test_ndcg@10_full_width", "tiers", "clients_trained",
                  "train_bytes_total", "rejected_total", "stragglers_total", "sim_time_s", "dp_epsilon", "mia_auc")


def run_case(name: str, out: Path, cache: Path) -> Path:
    """One case through the CLI, as a user runs it; its own process group so a hang can be killed."""
    flat = {**BASE, **CASES[name]}
    cmd = [sys.executable, "-m", "simulations.cli", "run", "--experiment-name", name,
           "--output-dir", str(out), "--cache-dir", str(cache)]
    for k, v in flat.items():
        cmd += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise RuntimeError(f"golden case {name} timed out: {err[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"golden case {name} failed: {err[-4000:]}")
    return out / name


def pinned(run: Path) -> tuple[str, str]:
    """The two texts a case pins: metrics.csv as written, and the summary's results as sorted JSON."""
    summary = json.loads((run / "summary.json").read_text())
    kept = {k: summary[k] for k in PINNED_SUMMARY if k in summary}
    return (run / "metrics.csv").read_text(), json.dumps(kept, indent=1, sort_keys=True) + "\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("golden")
    return {name: run_case(name, base / "out", base / "cache") for name in CASES}  # one teacher for all


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_run_matches_its_golden_files(runs, name):
    metrics, summary = pinned(runs[name])
    assert metrics == (GOLDEN / f"{name}.metrics.csv").read_text(), f"{name}: metrics.csv moved"
    assert summary == (GOLDEN / f"{name}.summary.json").read_text(), f"{name}: summary results moved"


def test_every_case_has_golden_files():
    """A case added without fixtures (or fixtures left behind by a removed case) is caught here."""
    names = {p.name.split(".")[0] for p in GOLDEN.iterdir()}
    assert names == set(CASES)


if __name__ == "__main__":  # rewrite fixtures: python tests/test_golden.py --write [case ...]
    import tempfile

    if sys.argv[1:2] != ["--write"]:
        sys.exit(__doc__)
    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[2:] or list(CASES):
            metrics, summary = pinned(run_case(name, Path(tmp) / "out", Path(tmp) / "cache"))
            (GOLDEN / f"{name}.metrics.csv").write_text(metrics)
            (GOLDEN / f"{name}.summary.json").write_text(summary)
            print(f"wrote {GOLDEN / name}.*")
