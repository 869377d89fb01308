"""Simulated time: how long a client's round takes on its device, and deadline rounds.

Units: seconds (s) for every time, bytes for payloads, kilobits per second for
bandwidths (1 kbit = 1000 bit, so ``seconds = bytes * 8 / (kbps * 1000)``), and
seconds per local step on the calibrated machine for ``step_seconds``.

One client's round on profile ``p`` (a :class:`fedkd.devices.DeviceProfile`)::

    total_s = down_bytes * 8 / (p.downlink_kbps * 1000)     # download the round's payload
            + steps * step_seconds / p.speed                 # local steps
            + up_bytes * 8 / (p.uplink_kbps * 1000)          # upload the reply

Deadline rounds (:func:`plan_client`): with a deadline ``D > 0`` a client runs as many
whole steps as fit, ``steps_within(D, ...)``, at most its budget ``max_steps``. If fewer
than ``min_steps`` fit it is a *straggler*. The policy decides what happens to its work:

``"drop"``
    a straggler's work is not used (it reports 0 used steps; its timing shows what
    ``min_steps`` would have needed, more than ``D``).
``"partial"``
    a straggler that fits at least one step sends what it managed (``steps`` = the
    steps that fit, finishing within ``D``) and is still recorded as a straggler; one
    that fits no step at all is dropped as under ``"drop"``.

``D = 0`` means no deadline: every client runs ``max_steps`` and none straggles.
The simulated wall time of a round (:func:`round_wall_seconds`) is the largest
``total_s`` among the participating clients, capped at the deadline (the server stops
waiting then), and a :class:`SimClock` accumulates it round by round.

Step time per student width comes from a calibration profile written by
``python -m simulations.calibrate`` (:func:`load_calibration`, :func:`step_seconds`).
A step's cost also grows with the catalogue size (the full-softmax output layer), so
use a calibration made with the experiment's ``num_items``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.devices import DeviceProfile

__all__ = [
    "CALIBRATION",
    "CALIBRATION_FORMAT",
    "POLICIES",
    "Calibration",
    "ClientTiming",
    "SimClock",
    "WidthTiming",
    "compute_seconds",
    "infer_seconds",
    "load_calibration",
    "plan_client",
    "relative_speed",
    "round_seconds",
    "round_wall_seconds",
    "step_seconds",
    "steps_within",
    "transfer_seconds",
]

POLICIES = ("drop", "partial")
#: Relative slack when comparing a simulated time with a deadline: absorbs float
#: rounding so that a case that fits exactly on paper also fits in floating point.
_REL_TOL = 1e-9


def _nonneg(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _pos(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def transfer_seconds(nbytes: float, kbps: float) -> float:
    """Seconds to move ``nbytes`` bytes at ``kbps`` kilobits per second (1 kbit = 1000 bit)."""
    return _nonneg("nbytes", nbytes) * 8.0 / (_pos("kbps", kbps) * 1000.0)


def compute_seconds(steps: int, step_seconds: float, speed: float) -> float:
    """Seconds for ``steps`` local steps of ``step_seconds`` each (calibrated machine) at ``speed``."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps * _nonneg("step_seconds", step_seconds) / _pos("speed", speed)


def round_seconds(down_bytes: float, up_bytes: float, steps: int, step_seconds: float,
                  profile: DeviceProfile) -> float:
    """Download + compute + upload seconds of one client round (formula in the module doc)."""
    return (transfer_seconds(down_bytes, profile.downlink_kbps)
            + compute_seconds(steps, step_seconds, profile.speed)
            + transfer_seconds(up_bytes, profile.uplink_kbps))


def _fits(total: float, deadline_s: float) -> bool:
    return total <= deadline_s * (1.0 + _REL_TOL)


def steps_within(deadline_s: float, down_bytes: float, up_bytes: float, step_seconds: float,
                 profile: DeviceProfile, max_steps: int) -> int:
    """The most whole steps ``n`` in ``[0, max_steps]`` with ``round_seconds(n) <= deadline_s``.

    0 when even the transfers alone miss the deadline. ``step_seconds == 0`` (free
    compute) gives ``max_steps`` whenever the transfers fit.
    """
    deadline_s = _nonneg("deadline_s", deadline_s)
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    step_seconds = _nonneg("step_seconds", step_seconds)
    transfers = (transfer_seconds(down_bytes, profile.downlink_kbps)
                 + transfer_seconds(up_bytes, profile.uplink_kbps))
    if not _fits(transfers, deadline_s):
        return 0
    if step_seconds == 0:
        return int(max_steps)
    per_step = step_seconds / profile.speed
    n = int(min(max_steps, math.floor((deadline_s - transfers) / per_step)))
    n = max(n, 0)
    # The closed form can be one off after float rounding; settle it on the exact formula.
    while n < max_steps and _fits(round_seconds(down_bytes, up_bytes, n + 1, step_seconds, profile), deadline_s):
        n += 1
    while n > 0 and not _fits(round_seconds(down_bytes, up_bytes, n, step_seconds, profile), deadline_s):
        n -= 1
    return n


@dataclass(frozen=True)
class ClientTiming:
    """One client's simulated round (seconds).

    ``steps`` are the local steps whose work the server uses (0 for a dropped
    straggler, whose times describe the ``min_steps`` it could not finish in time);
    ``straggler`` is True when fewer than ``min_steps`` fit the deadline.
    """

    download_s: float
    compute_s: float
    upload_s: float
    total_s: float
    steps: int
    straggler: bool

    @property
    def used(self) -> bool:
        """Does the server use this client's work this round?"""
        return self.steps > 0


def plan_client(profile: DeviceProfile, *, down_bytes: float, up_bytes: float, step_seconds: float,
                max_steps: int, deadline_s: float = 0.0, min_steps: int = 1,
                policy: str = "drop") -> ClientTiming:
    """How many steps a client runs this round and how long its round takes (module doc).

    Parameters
    ----------
    profile : the client's device.
    down_bytes, up_bytes : payload sizes of the round (student + proxy batch down, reply up).
    step_seconds : one local step on the calibrated machine (:func:`step_seconds`).
    max_steps : the client's step budget this round (its tier's steps), >= 1.
    deadline_s : the round deadline in seconds; 0 = none.
    min_steps : fewer steps than this within the deadline make a straggler; 1..max_steps.
    policy : ``"drop"`` or ``"partial"``.
    """
    if policy not in POLICIES:
        raise ValueError(f"straggler policy must be one of {POLICIES}, got {policy!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"min_steps must be in 1..max_steps ({max_steps}), got {min_steps}")
    deadline_s = _nonneg("deadline_s", deadline_s)
    down = transfer_seconds(down_bytes, profile.downlink_kbps)
    up = transfer_seconds(up_bytes, profile.uplink_kbps)

    def timing(steps: int, used: int, straggler: bool) -> ClientTiming:
        compute = compute_seconds(steps, step_seconds, profile.speed)
        return ClientTiming(download_s=down, compute_s=compute, upload_s=up, total_s=down + compute + up,
                            steps=used, straggler=straggler)

    if deadline_s == 0:
        return timing(max_steps, max_steps, False)
    fit = steps_within(deadline_s, down_bytes, up_bytes, step_seconds, profile, max_steps)
    if fit >= min_steps:
        return timing(fit, fit, False)
    if policy == "partial" and fit >= 1:
        return timing(fit, fit, True)
    return timing(min_steps, 0, True)


def round_wall_seconds(timings: Iterable[ClientTiming], deadline_s: float = 0.0) -> float:
    """Simulated wall time of a round: the slowest participant, capped at the deadline (0 = none).

    A round nobody takes part in lasts 0 s.
    """
    deadline_s = _nonneg("deadline_s", deadline_s)
    longest = max((t.total_s for t in timings), default=0.0)
    return min(longest, deadline_s) if deadline_s > 0 else longest


@dataclass
class SimClock:
    """Accumulates simulated seconds round by round; saves and restores as a dict."""

    seconds: float = 0.0
    rounds: list[tuple[int, float]] = field(default_factory=list)  # (round, its seconds)

    def advance(self, round_idx: int, seconds: float) -> float:
        """Add one round's simulated time; returns the new total."""
        seconds = _nonneg("round seconds", seconds)
        if self.rounds and round_idx <= self.rounds[-1][0]:
            raise ValueError(f"round {round_idx} after round {self.rounds[-1][0]}: rounds must increase")
        self.rounds.append((int(round_idx), seconds))
        self.seconds += seconds
        return self.seconds

    def state(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "rounds": [list(r) for r in self.rounds]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SimClock:
        return cls(seconds=float(state["seconds"]), rounds=[(int(r), float(s)) for r, s in state["rounds"]])


# --------------------------------------------------------------------------- calibration

CALIBRATION_FORMAT = "fedkd-calibration/1"
# The machine the shipped step times were measured on (docs/budgets.md); used when no calibration is set.
CALIBRATION = Path(__file__).with_name("reference_calibration.json")
_WIDTH_KEYS = ("params", "train_step_s", "train_step_p90_s", "infer_top10_s", "infer_top10_p99_s",
               "infer_batch64_s")


@dataclass(frozen=True)
class WidthTiming:
    """Measured costs of one student width on the calibrated machine (seconds)."""

    width: int
    params: int
    train_step_s: float       # median of one local step (CE on batch + KD on proxy rows)
    train_step_p90_s: float
    infer_top10_s: float      # median of one top-10 request, batch 1, full ranking
    infer_top10_p99_s: float
    infer_batch64_s: float    # median of one batch of 64 top-10 requests


@dataclass(frozen=True)
class Calibration:
    """A calibration profile (``python -m simulations.calibrate``); ``widths`` ascending."""

    num_items: int
    max_len: int
    widths: tuple[WidthTiming, ...]
    machine: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the whole file

    def width(self, width: int) -> WidthTiming:
        for w in self.widths:
            if w.width == width:
                return w
        raise KeyError(f"width {width} not calibrated (calibrated: {[w.width for w in self.widths]})")


def load_calibration(path: str | os.PathLike | Mapping[str, Any]) -> Calibration:
    """Read and validate a calibration JSON file (or its already-parsed dict)."""
    if isinstance(path, Mapping):
        data, src = path, "calibration"
    else:
        src = os.fspath(path)
        try:
            data = json.loads(Path(src).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{src}: calibration file not found (make one: python -m simulations.calibrate)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}: not valid JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{src}: expected a JSON object")
    if data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{src}: 'format' is {data.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
    for key in ("num_items", "max_len"):
        v = data.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{src}: {key!r} must be an integer >= 1, got {v!r}")
    entries = data.get("widths")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{src}: 'widths' must be a non-empty list of per-width measurements")
    widths = []
    for i, e in enumerate(entries, start=1):
        if not isinstance(e, Mapping):
            raise ValueError(f"{src}: widths entry {i}: expected an object")
        missing = [k for k in ("width",) + _WIDTH_KEYS if k not in e]
        if missing:
            raise ValueError(f"{src}: widths entry {i}: missing {', '.join(missing)}")
        w, p = e["width"], e["params"]
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"{src}: widths entry {i}: 'width' must be an integer >= 1, got {w!r}")
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"{src}: widths entry {i} (width {w}): 'params' must be an integer >= 1, got {p!r}")
        times = {}
        for k in _WIDTH_KEYS[1:]:
            v = e[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{src}: widths entry {i} (width {w}): {k!r} must be seconds > 0, got {v!r}")
            times[k] = float(v)
        widths.append(WidthTiming(width=w, params=p, **times))
    widths.sort(key=lambda t: t.width)
    if len({t.width for t in widths}) != len(widths):
        raise ValueError(f"{src}: a width is measured twice: {[t.width for t in widths]}")
    machine = data.get("machine", {})
    return Calibration(num_items=data["num_items"], max_len=data["max_len"], widths=tuple(widths),
                       machine=machine if isinstance(machine, Mapping) else {}, raw=data)


def _interpolate(cal: Calibration, width: int, key: str) -> float:
    ws = cal.widths
    if not ws[0].width <= width <= ws[-1].width:
        raise ValueError(f"student width {width} is outside the calibrated widths "
                         f"{ws[0].width}..{ws[-1].width}; calibrate it: python -m simulations.calibrate "
                         f"--widths {width}")
    for lo, hi in zip(ws, ws[1:]):
        if lo.width <= width <= hi.width:
            a, b = getattr(lo, key), getattr(hi, key)
            return a + (b - a) * (width - lo.width) / (hi.width - lo.width)
    return getattr(ws[0], key)  # a single calibrated width, asked for exactly


def step_seconds(calibration: Calibration, width: int) -> float:
    """Median seconds of one local step of a ``width`` student on the calibrated machine,
    linear in width between calibrated widths; outside their range it is an error."""
    return _interpolate(calibration, width, "train_step_s")


def infer_seconds(calibration: Calibration, width: int) -> float:
    """Median seconds of one top-10 request (batch 1), interpolated like :func:`step_seconds`."""
    return _interpolate(calibration, width, "infer_top10_s")


def relative_speed(reference: Calibration, device: Calibration) -> float:
    """A device's ``speed`` relative to the reference machine from two calibrations.

    The geometric mean over the widths both measured of ``reference train_step_s /
    device train_step_s`` (1.0 = as fast as the reference, 0.5 = half as fast).
    """
    if (reference.num_items, reference.max_len) != (device.num_items, device.max_len):
        raise ValueError(f"calibrations differ in (num_items, max_len): {reference.num_items, reference.max_len} "
                         f"vs {device.num_items, device.max_len}; calibrate both with the same data")
    common = sorted({w.width for w in reference.widths} & {w.width for w in device.widths})
    if not common:
        raise ValueError("the two calibrations share no student width")
    logs = [math.log(reference.width(w).train_step_s / device.width(w).train_step_s) for w in common]
    return math.exp(sum(logs) / len(logs))
