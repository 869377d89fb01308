"""Device profiles: how fast, how big, how well connected and how often online a client is.

A :class:`DeviceProfile` describes one simulated edge device. ``speed`` is relative to
the machine that produced the calibration profile (``speed = 1.0`` runs a local step in
exactly the calibrated ``train_step_s``; ``0.25`` takes four times as long), so the
simulated compute time of a client is ``steps * step_seconds / speed`` (see
:mod:`fedkd.simtime`). Bandwidths are in kilobits per second with 1 kbit = 1000 bit.

A fleet's profiles (one per client partition id, position = partition id) come from
one of two sources; both are pure functions of plain values, not of the config object.

Named tiers (:func:`tier_profiles`)
    Each tier has base values (comma-separated config strings such as
    ``tier-speed = "0.1,0.4,1.0"`` or sequences); clients get tiers through
    :func:`fedkd.budget.assign_tiers` (exact shares, shuffled by ``rng([seed, 3])``),
    so the device tier and the step-budget tier of a client are the same tier.
    ``spread > 0`` adds per-client variation ("from distributions"): the speed, memory
    and both bandwidths are multiplied by ``exp(spread * z)`` with ``z ~ N(0, 1)``
    (lognormal, so the tier value is the median and values stay positive) and the
    availability is moved in logit space, ``sigmoid(logit(p) + spread * z)`` (0 and 1
    stay exact). The five ``z`` are drawn, in that order, from
    the stream ``Stream.DEVICE_JITTER`` (``fedkd.streams``) keyed by partition: a client's variation depends on
    its seed and partition id only, never on the fleet's size or order.

Trace file (:func:`load_trace`)
    Measured or hand-written devices, one row per client, CSV (``.csv``) or JSON
    (``.json``). Columns / keys:

    ============== ======== ==========================================================
    client         int      partition id, 0-based; each id at most once
    tier           str      one of tier-names: it gives the device its tier-steps budget
    speed          float    relative compute speed, > 0 (1.0 = the calibrated machine)
    memory_mb      float    device memory in MB, > 0
    uplink_kbps    float    upload bandwidth in kbit/s (1 kbit = 1000 bit), > 0
    downlink_kbps  float    download bandwidth in kbit/s, > 0
    availability   float    probability of being online in a round, in [0, 1]
    online_rounds  optional the exact rounds (1-based, as the server numbers them) in
                            which the client is online; when given it overrides
                            ``availability`` for :func:`online`, deterministically
    ============== ======== ==========================================================

    CSV: a header row with these names (any order; ``online_rounds`` may be left out),
    then one row per client; ``online_rounds`` is a ``;``-separated list such as
    ``1;2;5``, and an empty cell means "use availability" (write availability 0 for a
    client that is never online)::

        client,tier,speed,memory_mb,uplink_kbps,downlink_kbps,availability,online_rounds
        0,weak,0.25,64,500,2000,0.8,
        1,strong,1.0,256,5000,20000,1.0,1;3

    JSON: a list of objects with these keys, or an object ``{"clients": [...]}``;
    ``online_rounds`` is a list of integers, absent or ``null`` meaning "use
    availability" and ``[]`` meaning never online::

        [{"client": 0, "tier": "weak", "speed": 0.25, "memory_mb": 64, "uplink_kbps": 500,
          "downlink_kbps": 2000, "availability": 0.8},
         {"client": 1, "tier": "strong", "speed": 1.0, "memory_mb": 256, "uplink_kbps": 5000,
          "downlink_kbps": 20000, "availability": 1.0, "online_rounds": [1, 3]}]

    Every client ``0 .. num_clients - 1`` of the fleet must have a row; rows for ids
    beyond the fleet are ignored, so one trace can serve smaller fleets. Unknown
    columns, missing fields, bad values and duplicate ids fail with a
    :class:`TraceError` naming the file and the line (CSV, 1-based, header = line 1)
    or entry (JSON, 1-based) and the field.

Availability per round (:func:`online`) is drawn from
the stream ``Stream.AVAILABILITY`` keyed by (round, partition): reproducible, and
independent of which clients are selected or in which order they are asked.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedkd import streams
from fedkd.budget import assign_tiers
from fedkd.streams import Stream

__all__ = [
    "DeviceProfile",
    "TraceError",
    "TRACE_FIELDS",
    "client_profile",
    "load_trace",
    "online",
    "parse_values",
    "tier_profiles",
]

#: Required trace columns, in the documented order (``online_rounds`` is optional).
TRACE_FIELDS: tuple[str, ...] = ("client", "tier", "speed", "memory_mb", "uplink_kbps", "downlink_kbps",
                                 "availability")
_OPTIONAL_FIELDS: tuple[str, ...] = ("online_rounds",)


class TraceError(ValueError):
    """A malformed device trace; the message names the file, the line or entry, and the field."""


@dataclass(frozen=True)
class DeviceProfile:
    """One edge device.

    Attributes
    ----------
    tier : device tier label.
    speed : relative compute speed, > 0; 1.0 = the calibrated machine.
    memory_mb : device memory in megabytes, > 0.
    uplink_kbps, downlink_kbps : bandwidths in kbit/s (1 kbit = 1000 bit), > 0.
    availability : probability of being online in a round, in [0, 1].
    online_rounds : when not None, the exact (1-based) rounds the device is online in;
        it overrides ``availability`` in :func:`online` (trace files only).
    """

    tier: str
    speed: float
    memory_mb: float
    uplink_kbps: float
    downlink_kbps: float
    availability: float
    online_rounds: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tier, str) or not self.tier.strip():
            raise ValueError(f"tier must be a non-empty string, got {self.tier!r}")
        for name in ("speed", "memory_mb", "uplink_kbps", "downlink_kbps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        a = self.availability
        if isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating)) \
                or not math.isfinite(a) or not 0 <= a <= 1:
            raise ValueError(f"availability must be a number in [0, 1], got {a!r}")
        object.__setattr__(self, "availability", float(a))
        if self.online_rounds is not None:
            rounds = list(self.online_rounds)
            if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 1 for r in rounds):
                raise ValueError(f"online_rounds must be integers >= 1 (rounds are 1-based), got {rounds!r}")
            object.__setattr__(self, "online_rounds", frozenset(int(r) for r in rounds))


# --------------------------------------------------------------------------- named tiers


def parse_values(values: str | Sequence[float], field: str, count: int) -> list[float]:
    """``"0.1,0.4,1.0"`` or a sequence -> ``count`` floats; the error names ``field``."""
    if isinstance(values, str):
        parts = [p.strip() for p in values.split(",") if p.strip()]
    else:
        parts = list(values)
    if len(parts) == 1 and count > 1:  # one value serves every tier
        parts = parts * count
    if len(parts) != count:
        raise ValueError(f"{field} needs 1 value or {count} comma-separated values, one per tier, got {values!r}")
    out = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"{field} has a value that is not a number: {p!r} in {values!r}") from None
        out.append(v)
    return out


def client_profile(base: DeviceProfile, *, seed: int, partition_id: int, spread: float) -> DeviceProfile:
    """``base`` with this client's seeded lognormal variation (``spread`` = sigma; 0 = ``base``).

    Depends on ``(seed, partition_id, spread)`` only, so a client keeps its profile whatever
    the fleet around it.
    """
    if not math.isfinite(spread) or spread < 0:
        raise ValueError(f"device spread must be a finite number >= 0, got {spread!r}")
    if partition_id < 0:
        raise ValueError(f"partition id must be >= 0, got {partition_id}")
    if spread == 0:
        return base
    z = streams.rng(seed, Stream.DEVICE_JITTER, partition_id).standard_normal(5)
    f = np.exp(spread * z[:4])
    p = base.availability
    if 0 < p < 1:
        p = float(1.0 / (1.0 + math.exp(-(math.log(p / (1 - p)) + spread * z[4]))))
    return replace(base, speed=base.speed * f[0], memory_mb=base.memory_mb * f[1],
                   uplink_kbps=base.uplink_kbps * f[2], downlink_kbps=base.downlink_kbps * f[3],
                   availability=min(max(p, 0.0), 1.0))


def tier_profiles(names: str | Sequence[str], shares: str | Sequence[float], *,
                  speed: str | Sequence[float], memory_mb: str | Sequence[float],
                  uplink_kbps: str | Sequence[float], downlink_kbps: str | Sequence[float],
                  availability: str | Sequence[float], num_clients: int, seed: int,
                  spread: float = 0.0) -> list[DeviceProfile]:
    """Profiles of a fleet built from named tiers; position = partition id.

    Every per-tier argument is a comma-separated string (as in the config) or a sequence
    with one value per tier of ``names``. Tier membership is
    ``assign_tiers(num_clients, shares, seed)``, the same as the step-budget tiers.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"tier names must be one or more distinct names, got {names!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    n = len(names)
    share_values = parse_values(shares, "tier-shares", n)
    if any(s < 0 for s in share_values) or abs(sum(share_values) - 1) > 1e-6:
        raise ValueError(f"tier-shares must be non-negative and sum to 1, got {shares!r}")
    columns = {key: parse_values(v, "tier-" + key.replace("_", "-"), n)
               for key, v in (("speed", speed), ("memory_mb", memory_mb), ("uplink_kbps", uplink_kbps),
                              ("downlink_kbps", downlink_kbps), ("availability", availability))}
    bases = []
    for i, name in enumerate(names):
        try:
            bases.append(DeviceProfile(tier=name, **{k: v[i] for k, v in columns.items()}))
        except ValueError as e:
            raise ValueError(f"tier {name!r}: {e}") from None
    tiers = assign_tiers(num_clients, share_values, seed)
    return [client_profile(bases[int(t)], seed=seed, partition_id=pid, spread=spread)
            for pid, t in enumerate(tiers)]


# --------------------------------------------------------------------------- trace files


def load_trace(path: str | os.PathLike, num_clients: int) -> list[DeviceProfile]:
    """Profiles of clients ``0 .. num_clients - 1`` from a CSV or JSON trace (format above)."""
    src = os.fspath(path)
    file = Path(src)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not file.is_file():
        raise TraceError(f"{src}: trace file not found")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(file, src)
    elif suffix == ".json":
        rows = _json_rows(file, src)
    else:
        raise TraceError(f"{src}: unknown trace format {suffix or '(no suffix)'!r}; use .csv or .json")
    found: dict[int, tuple[str, DeviceProfile]] = {}
    for where, record in rows:
        pid, profile = _parse_record(record, src, where)
        if pid in found:
            raise TraceError(f"{src}: {where}: client {pid} already given at {found[pid][0]}")
        found[pid] = (where, profile)
    missing = [pid for pid in range(num_clients) if pid not in found]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise TraceError(f"{src}: no row for client(s) {shown}; the fleet has {num_clients} clients "
                         f"(ids 0..{num_clients - 1}) and each needs one row")
    return [found[pid][1] for pid in range(num_clients)]


def _check_columns(columns: Sequence[str], src: str, where: str) -> None:
    unknown = [c for c in columns if c not in TRACE_FIELDS + _OPTIONAL_FIELDS]
    if unknown:
        raise TraceError(f"{src}: {where}: unknown column(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(TRACE_FIELDS + _OPTIONAL_FIELDS)}")
    missing = [c for c in TRACE_FIELDS if c not in columns]
    if missing:
        raise TraceError(f"{src}: {where}: missing column(s) {', '.join(missing)}")


def _csv_rows(file: Path, src: str) -> list[tuple[str, dict[str, Any]]]:
    with file.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{src}: empty trace file (expected a header row)")
        header = [h.strip() for h in header]
        _check_columns(header, src, "line 1 (header)")
        rows = []
        for values in reader:
            where = f"line {reader.line_num}"
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise TraceError(f"{src}: {where}: {len(values)} fields, the header has {len(header)}")
            record: dict[str, Any] = dict(zip(header, (v.strip() for v in values)))
            if "online_rounds" in record:
                text = record["online_rounds"]
                record["online_rounds"] = None if text == "" else [t.strip() for t in text.split(";")]
            rows.append((where, record))
    return rows


def _json_rows(file: Path, src: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TraceError(f"{src}: not valid JSON: {e}") from None
    if isinstance(data, Mapping) and set(data) == {"clients"}:
        data = data["clients"]
    if not isinstance(data, list):
        raise TraceError(f"{src}: expected a list of client objects or {{\"clients\": [...]}}")
    rows = []
    for i, record in enumerate(data, start=1):
        where = f"entry {i}"
        if not isinstance(record, Mapping):
            raise TraceError(f"{src}: {where}: expected an object, got {record!r}")
        _check_columns(list(record), src, where)
        rows.append((where, dict(record)))
    return rows


def _whole(raw: Any) -> int | None:
    """``raw`` as an integer, or None if it is not one: ``int()`` alone would take ``True`` as 1
    and truncate ``2.5`` to 2, and a trace with either is a broken trace, not a number."""
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _parse_record(record: Mapping[str, Any], src: str, where: str) -> tuple[int, DeviceProfile]:
    def fail(field: str, value: Any, expected: str) -> TraceError:
        return TraceError(f"{src}: {where}: field {field!r} has invalid value {value!r}: expected {expected}")

    raw = record["client"]
    pid = _whole(raw)
    if pid is None or pid < 0:
        raise fail("client", raw, "an integer partition id >= 0")
    where = f"{where} (client {pid})"
    tier = record["tier"]
    if not isinstance(tier, str) or not tier.strip():
        raise fail("tier", tier, "a non-empty name")
    values: dict[str, float] = {}
    for field in ("speed", "memory_mb", "uplink_kbps", "downlink_kbps", "availability"):
        v = record[field]
        try:
            if isinstance(v, bool):
                raise ValueError
            x = float(v)
        except (TypeError, ValueError):
            x = float("nan")
        ok = math.isfinite(x) and (0 <= x <= 1 if field == "availability" else x > 0)
        if not ok:
            raise fail(field, v, "a number in [0, 1]" if field == "availability" else "a finite number > 0")
        values[field] = x
    rounds_raw = record.get("online_rounds")
    rounds = None
    if rounds_raw is not None:
        if not isinstance(rounds_raw, list):
            raise fail("online_rounds", rounds_raw, "a list of rounds (JSON) or '1;2;5' (CSV)")
        rounds = []
        for r in rounds_raw:
            ri = _whole(r)
            if ri is None:
                raise fail("online_rounds", rounds_raw, "integer rounds >= 1")
            if ri < 1:
                raise fail("online_rounds", rounds_raw, "integer rounds >= 1 (rounds are 1-based)")
            rounds.append(ri)
    return pid, DeviceProfile(tier=tier.strip(), online_rounds=None if rounds is None else frozenset(rounds),
                              **values)


# --------------------------------------------------------------------------- availability


def online(profile: DeviceProfile, seed: int, round_idx: int, partition_id: int) -> bool:
    """Is this client online in round ``round_idx`` (1-based)?

    ``profile.online_rounds``, when set, decides exactly; otherwise one uniform draw from
    a draw of ``Stream.AVAILABILITY`` keyed by (round, partition) is compared with the
    availability (1.0 is always online, 0.0 never).
    """
    if profile.online_rounds is not None:
        return int(round_idx) in profile.online_rounds
    if profile.availability >= 1.0:
        return True
    if profile.availability <= 0.0:
        return False
    u = streams.rng(seed, Stream.AVAILABILITY, round_idx, partition_id).random()
    return bool(u < profile.availability)
