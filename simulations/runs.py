"""A run's results folder, read in one place: every report in simulations/ loads runs here.

A run (``fedkd run``, ``flwr run .``, ``fedkd deploy``) writes ``<output-dir>/<name>/``:
``config.json`` first (its flat settings under ``"config"``), ``metrics.csv`` one row per
round as each round ends, the ``test_per_client*.csv`` files at the end, and ``summary.json``
last, so a folder with a summary is a finished run. A sweep keeps its runs in
``<sweep folder>/runs/<config>-s<seed>/``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from fedkd.results import read_metrics

_SEED_SUFFIX = re.compile(r"^(?P<config>.+)-s(?P<seed>\d+)$")


class UserScore(NamedTuple):
    """One test user's line of a per-client test file."""

    tier: int | None  # device tier index (None in files written before tiers existed)
    ndcg: float  # NDCG@k of the user's test item


@dataclass(frozen=True)
class Run:
    """One results folder. Each file is read when first asked for, then kept, so a report may
    list unfinished runs (no summary, perhaps no metrics yet) without reading what it skips."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        """Whether summary.json exists: it is written last, so the run ended."""
        return (self.path / "summary.json").is_file()

    @cached_property
    def config(self) -> dict:
        """The flat settings the run ran with (``config.json``'s ``"config"``)."""
        return json.loads((self.path / "config.json").read_text())["config"]

    @cached_property
    def summary(self) -> dict | None:
        """``summary.json``; None while the run has not finished."""
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @cached_property
    def rows(self) -> list[dict]:
        """``metrics.csv``, a dict per round: numbers as floats, empty cells as "" ([] without the file)."""
        path = self.path / "metrics.csv"
        return read_metrics(path) if path.is_file() else []

    def per_user(self, file: str = "test_per_client.csv") -> dict[int, UserScore]:
        """Per test user (partition id), from a per-client test file: ``test_per_client.csv``
        (the chosen model), ``test_per_client_r<R>.csv`` (after round R) or
        ``test_per_client_full_width.csv`` (the full-width student, nested widths)."""
        with (self.path / file).open() as f:
            return {int(r["partition_id"]): UserScore(int(r["tier"]) if "tier" in r else None,
                                                      float(r["ndcg_sum"]) / max(float(r["count"]), 1.0))
                    for r in csv.DictReader(f)}

    def user_ndcg(self, file: str = "test_per_client.csv") -> dict[int, float]:
        """NDCG@k per test user of :meth:`per_user`'s file."""
        return {user: score.ndcg for user, score in self.per_user(file).items()}


def load_run(path: Path) -> Run:
    """The results folder at ``path`` (nothing is read until asked for)."""
    return Run(Path(path))


def load_runs(folder: Path) -> list[Run]:
    """The results folders of a sweep folder (those in its ``runs/``) or of any folder of
    results folders, by name. Folders moved aside by a rerun (``<name>.old-<time>``) and
    folders with neither config.json nor summary.json are not runs."""
    root = folder / "runs" if (folder / "runs").is_dir() else folder
    return [Run(d) for d in sorted(root.iterdir()) if d.is_dir() and ".old-" not in d.name
            and ((d / "config.json").is_file() or (d / "summary.json").is_file())]


def split_seed(name: str) -> tuple[str, int | None]:
    """A run's name as (config, seed): ``fedkd-8-s2`` is ("fedkd-8", 2); a name without the
    ``-s<seed>`` suffix is (name, None)."""
    m = _SEED_SUFFIX.match(name)
    return (m["config"], int(m["seed"])) if m else (name, None)
