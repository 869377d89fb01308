"""One results folder per experiment: config, tidy per-round CSV, summary, plots, logs.

Rows are appended and flushed as each round ends, so a run that dies keeps every round
it finished. An existing folder is never overwritten: it is moved aside first.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def prepare_dir(path: Path) -> Path | None:
    """Create an empty results folder; move an existing one to ``<name>.old-<time>``.

    Returns where the old folder went (None if there was none).
    """
    moved = None
    if path.exists() and any(path.iterdir()):
        moved = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while moved.exists():
            moved, n = moved.with_name(f"{moved.name}-{n}"), n + 1
        path.rename(moved)
    path.mkdir(parents=True, exist_ok=True)
    return moved


def write_json(path: Path, obj: object) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(o: object) -> object:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


class CsvLog:
    """Append-only CSV whose columns are fixed by the first row (or, when the file already
    has rows, as after a resume, by its header)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as f:
                self.fields = next(csv.reader(f))

    def append(self, row: Mapping[str, object]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="raise")
            if new:
                w.writeheader()
            w.writerow(row)

    def extend(self, rows: Sequence[Mapping[str, object]]) -> None:
        for r in rows:
            self.append(r)


class JsonLines:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, obj: Mapping[str, object]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(obj, sort_keys=True, default=_jsonable) + "\n")


def state_digest(state: Mapping[str, np.ndarray] | None) -> str:
    """First 16 hex digits of sha256 over a model state's float32 bytes, keys in sorted order.

    Identifies a global model across processes and machines (a deployment and a simulation
    of the same seed should print the same digest); empty for protocols with no global state.
    """
    if state is None:
        return ""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(np.ascontiguousarray(state[key], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as f:  # a digest of only digits is text, not a number
        return [{k: v if k == "model_digest" else _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def save_student(out_dir: Path, state: Mapping[str, np.ndarray], model_cfg) -> Path:
    """``student.pt`` (a torch state dict, loadable with weights_only) and ``student.json``
    (its ModelConfig), written atomically, so a results folder can be exported to a device."""
    import dataclasses

    import torch

    path = out_dir / "student.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, tmp)
    os.replace(tmp, path)
    write_json(out_dir / "student.json", dataclasses.asdict(model_cfg))
    return path
