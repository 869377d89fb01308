"""Keep a sweep's finished runs in the repository: the small files every report reads.

    python -m simulations.keep_runs outputs/sweeps/private-fleet docs/runs/private-fleet
    python -m simulations.keep_runs outputs/sweeps/convergence docs/runs/convergence --configs fedkd-c20 --models

A sweep at the converged settings costs CPU hours (the private fleet: 31 runs of 20-40 minutes on
2 cores), and ``outputs/`` is not committed: a machine that is wiped between sessions loses
them all, and a report over three seeds can then not be rebuilt. So the files a report reads
(``config.json``, ``summary.json``, ``metrics.csv``, the per-user test files, ``privacy.json``,
``rejections.jsonl``, ``timing.csv``) are copied into a committed folder, about 100 kB a run,
in the sweep folder's own layout (``sweep.json`` and ``runs/<config>-s<seed>/``), so every report
(``fedkd report``, ``simulations.privacy_report``, ``--include``) reads the copy as it reads the
sweep. Checkpoints, the wire log and the run log stay behind: they are large, and no table is
made from them. ``--models`` also keeps the chosen student (``student.pt`` and ``student.json``,
about 120 kB for the ML-100K student), for a run whose model later work starts from (the export
benchmark quantizes and prunes the converged fedkd-c20 student).

Only finished runs (a ``summary.json``) are kept, never a folder moved aside by a rerun, and a
run already kept is copied again only when its files changed, so this can run after every run.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from simulations.runs import load_runs, split_seed

KEPT = ("config.json", "summary.json", "metrics.csv", "privacy.json", "rejections.jsonl", "timing.csv")
KEPT_GLOB = "test_per_client*.csv"  # the chosen model's per-user scores, and any per-round ones
MODELS = ("student.pt", "student.json")


def kept_files(run_dir: Path, models: bool = False) -> list[Path]:
    """The files of ``run_dir`` that are kept, those it has."""
    names = KEPT + (MODELS if models else ())
    return [run_dir / n for n in names if (run_dir / n).is_file()] + sorted(run_dir.glob(KEPT_GLOB))


def keep(sweep: Path, dest: Path, configs: Sequence[str] = (), models: bool = False) -> list[str]:
    """Copy the finished runs of ``sweep`` (of ``configs`` only, when given; their students too
    with ``models``) into ``dest``; the names of the runs whose files were new or changed."""
    if not (sweep / "sweep.json").is_file() and not (sweep / "runs").is_dir():
        raise SystemExit(f"{sweep}: not a sweep folder (no sweep.json and no runs/)")
    dest.mkdir(parents=True, exist_ok=True)
    if (sweep / "sweep.json").is_file():
        shutil.copy2(sweep / "sweep.json", dest / "sweep.json")
    changed = []
    for run in load_runs(sweep):
        if not run.finished or (configs and split_seed(run.name)[0] not in configs):
            continue
        target = dest / "runs" / run.name
        target.mkdir(parents=True, exist_ok=True)
        fresh = False
        for f in kept_files(run.path, models):
            out = target / f.name
            if not out.is_file() or not filecmp.cmp(f, out, shallow=False):
                shutil.copy2(f, out)
                fresh = True
        if fresh:
            changed.append(run.name)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.keep_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="The sweep folder (e.g. outputs/sweeps/private-fleet).")
    p.add_argument("dest", type=Path, help="Where to keep its runs (e.g. docs/runs/private-fleet); "
                                           "created if missing.")
    p.add_argument("--configs", nargs="+", default=(), metavar="NAME",
                   help="Keep only these configs' runs (default: every finished run).")
    p.add_argument("--models", action="store_true",
                   help="Also keep each run's chosen student (student.pt, student.json).")
    args = p.parse_args(argv)
    changed = keep(args.sweep, args.dest, args.configs, args.models)
    print(f"kept {len(changed)} new or changed run(s) in {args.dest}" + (": " + ", ".join(changed) if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
