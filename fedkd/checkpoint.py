"""Checkpoints of a run, written atomically after every round, and what a resume restores.

A checkpoint holds everything the round loop carries from one round to the next: the
global student, the best model so far (model selection), counters (bytes, simulated time,
the clock's upload estimates, clients trained), a refined teacher and its optimiser, the
server-side student's optimiser (``proxy`` protocol), the process-wide random states, and
the length of every results file the loop appends to. Per-round random draws are derived
from ``(seed, stream, round, ...)`` and need no state; the global RNG states are saved
anyway, so code that one day draws from them still resumes exactly (as Opacus saves its
accountant with the model). fedkd has no privacy accountant yet; when one lands, its
state belongs here too.

Written as ``checkpoint.pt.tmp``, flushed to disk, then renamed over ``checkpoint.pt``:
a kill at any moment leaves either the previous complete checkpoint or the new one, never
half a file. The file is a pickle (``torch.save``) and is loaded with ``weights_only=False``
because it holds RNG states and nested dicts; it is the run's own output, never a download.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from fedkd.config import settings_differ  # the rule a finished run's staleness follows too

NAME = "checkpoint.pt"
VERSION = 2  # 2: {part name: part state} (server/experiment.py)
# Keys a resume may change: how the run is shown and that it is a resume, not what it computes.
MAY_DIFFER = ("resume", "progress")


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def file_sizes(out_dir: Path, names) -> dict[str, int]:
    """Bytes of each append-only results file now (0 for one not written yet)."""
    return {n: (out_dir / n).stat().st_size if (out_dir / n).exists() else 0 for n in names}


def save(out_dir: Path, payload: dict) -> Path:
    """Write ``payload`` (plus version and RNG states) atomically as ``out_dir/checkpoint.pt``."""
    path = out_dir / NAME
    tmp = path.with_name(NAME + ".tmp")
    with tmp.open("wb") as f:
        torch.save({"version": VERSION, "rng": rng_states(), **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(out_dir: Path, config: dict) -> dict:
    """The last checkpoint of ``out_dir``, after checking it belongs to ``config``.

    Raises ValueError naming what is missing or which keys differ, so a resume never mixes
    two experiments."""
    path = out_dir / NAME
    if not path.is_file():
        raise ValueError(f"cannot resume: no checkpoint {path} (the run did not finish a round, or "
                         "output-dir/experiment-name point elsewhere)")
    ck = torch.load(path, weights_only=False)
    if ck.get("version") != VERSION:
        raise ValueError(f"cannot resume: {path} has checkpoint version {ck.get('version')}, expected {VERSION}")
    saved = ck["config"]
    diff = [k for k in settings_differ(saved, config) if k not in MAY_DIFFER]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume {out_dir}: the config differs from the checkpoint's in {shown}")
    return ck


def truncate(out_dir: Path, sizes: dict[str, int], rewritten) -> None:
    """Cut every appended results file back to its length at the checkpoint, and remove the
    files the end of a run writes from scratch (``rewritten``), so a resumed run appends
    exactly what an uninterrupted one would have."""
    for name, size in sizes.items():
        p = out_dir / name
        if p.exists():
            with p.open("r+b") as f:
                f.truncate(size)
    for pattern in rewritten:
        for p in out_dir.glob(pattern):
            if p.name not in sizes:
                p.unlink()
