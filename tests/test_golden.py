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

Byte for byte holds on one kind of CPU, not across kinds: torch dispatches its kernels by the
vector instructions a CPU has (``torch.backends.cpu.get_cpu_capability()``) and MKL by its
maker, so an AVX2-only AMD EPYC rounds floats differently from the machine the first fixtures
were written on, from round 1 on (2026-12-01: every case moved there, with the code unchanged).
So ``tests/golden/`` holds one set per kind of machine: the top-level files, written on the
development machine of November 2026 (its kind was not recorded), and ``tests/golden/<kind>/``
(e.g. ``AVX2-AuthenticAMD``), written on that kind. A run passes when it equals one of the
sets; a behaviour change moves it away from every set, and ``--write`` rewrites the set of the
machine it runs on (a behaviour change must rewrite every kind's set on its kind, or delete the
sets it cannot rewrite). The same holds for a case whose settings change: on 2026-12-01
logits-refine was shortened, rewritten in the AVX2-AuthenticAMD set and deleted from the
November set.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

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


def machine_kind() -> str:
    """What decides how this machine rounds floats: torch's kernel ISA and the CPU's maker."""
    vendor = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()}-{vendor}"


def golden_sets() -> list[Path]:
    """The fixture sets, this machine's kind first (the one a failure is shown against)."""
    own = GOLDEN / machine_kind()
    others = [GOLDEN] + sorted(d for d in GOLDEN.iterdir() if d.is_dir() and d != own)
    return ([own] if own.is_dir() else []) + others


def assert_golden(name: str, metrics: str, summary: str) -> None:
    """``metrics`` and ``summary`` (:func:`pinned`) equal case ``name``'s files in one of the sets
    that have the case (a case whose settings changed keeps only the sets rewritten since)."""
    sets = [s for s in golden_sets() if (s / f"{name}.metrics.csv").is_file()]
    assert sets, f"{name}: no golden set has this case; write one: python tests/test_golden.py --write {name}"
    for s in sets:
        if metrics == (s / f"{name}.metrics.csv").read_text() and summary == (s / f"{name}.summary.json").read_text():
            return
    ref = sets[0]
    where = f"equal to no golden set ({', '.join(str(s.relative_to(GOLDEN.parent)) for s in sets)}); shown against {ref.name}"
    assert metrics == (ref / f"{name}.metrics.csv").read_text(), f"{name}: metrics.csv moved: {where}"
    assert summary == (ref / f"{name}.summary.json").read_text(), f"{name}: summary results moved: {where}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_run_matches_its_golden_files(golden, name):
    """``golden`` (tests/conftest.py): each case run once per session, one teacher for all."""
    assert_golden(name, *pinned(golden[name].out))


def test_every_case_has_a_set_and_no_set_a_removed_case():
    """A case added without fixtures (or fixtures left behind by a removed case) is caught here.
    A set may lack a case: the one whose settings changed after the set was written, on a kind
    of machine that could not rewrite it."""
    held = set()
    for s in golden_sets():
        names = {p.name.split(".")[0] for p in s.iterdir() if p.is_file()}
        assert names <= set(CASES), s
        assert all((s / f"{n}.summary.json").is_file() and (s / f"{n}.metrics.csv").is_file() for n in names), s
        held |= names
    assert held == set(CASES)


def test_a_run_equal_to_any_set_passes_and_one_equal_to_none_fails(tmp_path, monkeypatch):
    import test_golden

    for kind, value in (("", "a"), ("AVX2-AuthenticAMD", "b")):
        (tmp_path / kind).mkdir(exist_ok=True)
        for case in CASES:
            (tmp_path / kind / f"{case}.metrics.csv").write_text(f"metrics {value}\n")
            (tmp_path / kind / f"{case}.summary.json").write_text(f"summary {value}\n")
    monkeypatch.setattr(test_golden, "GOLDEN", tmp_path)
    monkeypatch.setattr(test_golden, "machine_kind", lambda: "AVX512-GenuineIntel")  # a kind without its own set
    assert [s.name for s in golden_sets()] == [tmp_path.name, "AVX2-AuthenticAMD"]
    assert_golden("default", "metrics a\n", "summary a\n")
    assert_golden("default", "metrics b\n", "summary b\n")
    with pytest.raises(AssertionError, match="summary results moved"):
        assert_golden("default", "metrics a\n", "summary b\n")  # one set's metrics, another's summary
    with pytest.raises(AssertionError, match="metrics.csv moved: equal to no golden set"):
        assert_golden("default", "metrics c\n", "summary a\n")
    monkeypatch.setattr(test_golden, "machine_kind", lambda: "AVX2-AuthenticAMD")  # its own set comes first
    assert [s.name for s in golden_sets()] == ["AVX2-AuthenticAMD", tmp_path.name]
    # a set without the case (its settings changed after the set was written) is not compared
    for ext in ("metrics.csv", "summary.json"):
        (tmp_path / f"default.{ext}").unlink()
    assert_golden("default", "metrics b\n", "summary b\n")
    with pytest.raises(AssertionError, match=r"equal to no golden set \([^,)]*AVX2-AuthenticAMD\)"):
        assert_golden("default", "metrics a\n", "summary a\n")


if __name__ == "__main__":  # rewrite fixtures: python tests/test_golden.py --write [case ...]
    import tempfile

    if sys.argv[1:2] != ["--write"]:
        sys.exit(__doc__)
    own = GOLDEN / machine_kind()  # this machine's set (see the docstring)
    own.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[2:] or list(CASES):
            metrics, summary = pinned(run_case(name, Path(tmp) / "out", Path(tmp) / "cache").out)
            (own / f"{name}.metrics.csv").write_text(metrics)
            (own / f"{name}.summary.json").write_text(summary)
            print(f"wrote {own / name}.*")
