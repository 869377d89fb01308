"""Fault injection: which fault a client suffers in a round, and what a corrupt reply looks like.

Real fleets crash, hang, send garbage and sometimes lie. fedkd injects these faults in the
real ClientApp (Flower mods in ``clients/mods/faults.py``) so that the server meets them
exactly as it would in a deployment: a crash is an exception (Flower turns it into an error
reply), a hang is a sleep past the server's ``round-timeout``, a corrupt reply is a reply
with broken arrays or metrics, and a malicious client sends a well-formed but scaled update.

Which fault a client suffers is a pure function of ``(seed, round, partition id)``
(:func:`draw_fault`), from its own random stream, so a faulty run repeats exactly, the
other random draws of the run are untouched, and a test can list in advance every fault a
run will meet. Faults apply to ``train`` messages only: evaluation stays the yardstick.

Pure numpy; the one corruption below the numpy level (undecodable bytes) lives in
:func:`wire.garble`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedkd import streams
from fedkd.config import FAULT_KINDS, ExperimentConfig
from fedkd.streams import Stream

# The reason code the server is expected to log for each injected corruption.
EXPECTED_REASON = {"nan": "non-finite", "inf": "non-finite", "shape": "shape", "dtype": "dtype",
                   "missing-key": "missing-key", "oversized": "oversized", "undecodable": "undecodable",
                   "steps": "steps", "crash": "crashed", "hang": "timeout"}
HANG_MARGIN_S = 2.0  # a hanging client sleeps round-timeout plus this


def draw_fault(cfg: ExperimentConfig, round_idx: int, partition_id: int) -> str | None:
    """The fault of this client in this round: ``crash``, ``hang``, a corruption kind, or None."""
    if cfg.fault_crash == cfg.fault_hang == cfg.fault_corrupt == 0:
        return None
    rng = streams.rng(cfg.seed, Stream.FAULTS, round_idx, partition_id)
    u, pick = rng.random(), rng.random()
    if u < cfg.fault_crash:
        return "crash"
    if u < cfg.fault_crash + cfg.fault_hang:
        return "hang"
    if u < cfg.fault_crash + cfg.fault_hang + cfg.fault_corrupt:
        kinds = cfg.lists.fault_corrupt_kinds
        return kinds[min(int(pick * len(kinds)), len(kinds) - 1)]
    return None


def malicious_ids(cfg: ExperimentConfig) -> set[int]:
    return set(cfg.lists.fault_malicious)


def corrupt(arrays: Mapping[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """A copy of one uploaded record (e.g. the quantised update) broken as ``kind`` says.

    Each corruption breaks exactly one thing, so the server's reason can be checked:
    ``nan``/``inf`` poison the first float array (a scale, or the float32 values), ``shape``
    drops the last element of the first array, ``dtype`` widens it to a dtype of another
    size, ``missing-key`` drops it, ``oversized`` adds a padding array of 1 MiB or four
    times the record, whichever is larger. ``undecodable`` and ``steps`` act elsewhere
    (:func:`wire.garble`, the reported step count) and return the record unchanged.
    """
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    out = {k: np.array(v, copy=True) for k, v in arrays.items()}
    if not out or kind in ("undecodable", "steps"):
        return out
    first = sorted(out)[0]
    if kind in ("nan", "inf"):
        floats = [k for k in sorted(out) if np.issubdtype(out[k].dtype, np.floating) and out[k].size]
        if floats:
            out[floats[0]].flat[0] = np.nan if kind == "nan" else np.inf
        else:  # nothing to poison: send a float array of NaN in its place (still non-finite)
            out[first] = np.full(out[first].shape, np.nan if kind == "nan" else np.inf, np.float32)
    elif kind == "shape":
        out[first] = out[first].ravel()[:-1] if out[first].size else np.zeros(1, out[first].dtype)
    elif kind == "dtype":
        wider = {1: np.uint16, 2: np.uint32, 4: np.float64, 8: np.float32}[out[first].dtype.itemsize]
        out[first] = out[first].astype(wider)
    elif kind == "missing-key":
        del out[first]
    elif kind == "oversized":
        size = sum(v.nbytes for v in out.values())
        out["padding"] = np.zeros(max(1 << 20, 4 * size), np.uint8)
    return out
