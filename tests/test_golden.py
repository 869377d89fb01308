"""Golden runs: what the round loop computes, pinned byte for byte before the server is redesigned.

Six short real Flower simulations (the CLI in a subprocess, Ray included) cover every path
through the round loop: the default synthetic experiment, nested widths under a deadline (a
device trace deciding tiers and who is online, aggregated with the trimmed mean),
secure aggregation, the logit protocol with teacher refinement, injected faults with norm
bounding, and central differential privacy. For each, ``metrics.csv`` (every column: wall
times live in ``timing.csv``) and the test metrics of ``summary.json`` must equal the files
under ``tests/golden/``. A change that moves any of them is either a bug or a behaviour
change that the changelog must name, with the fixtures rewritten by::

    python tests/test_golden.py --write        # all cases; or name some: ... --write dp
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from e2e_runs import CASES, run_case  # the cases and how they run, shared with other tests (conftest.py)

GOLDEN = Path(__file__).with_name("golden")
# summary.json keys that are results of the run (not wall times, paths or the teacher's cache state)
PINNED_SUMMARY = ("best_round", "best_val_ndcg", "test_hr@10", "test_ndcg@10", "test_users",
                  "test_hr@10_full_width", "test_ndcg@10_full_width", "tiers", "clients_trained",
                  "train_bytes_total", "rejected_total", "stragglers_total", "sim_time_s", "dp_epsilon", "mia_auc",
                  "test_hr@10_float32", "test_ndcg@10_float32")


def pinned(run: Path) -> tuple[str, str]:
    """The two texts a case pins: metrics.csv as written, and the summary's results as sorted JSON."""
    summary = json.loads((run / "summary.json").read_text())
    kept = {k: summary[k] for k in PINNED_SUMMARY if k in summary}
    return (run / "metrics.csv").read_text(), json.dumps(kept, indent=1, sort_keys=True) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_run_matches_its_golden_files(golden, name):
    """``golden`` (tests/conftest.py): each case run once per session, one teacher for all."""
    metrics, summary = pinned(golden[name].out)
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
            metrics, summary = pinned(run_case(name, Path(tmp) / "out", Path(tmp) / "cache").out)
            (GOLDEN / f"{name}.metrics.csv").write_text(metrics)
            (GOLDEN / f"{name}.summary.json").write_text(summary)
            print(f"wrote {GOLDEN / name}.*")
