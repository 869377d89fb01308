"""Wire audit: what crossed between the cloud and the devices, and a check that no private
history did.

The server writes one JSON line per message it sends or receives to ``wire.jsonl``
(direction, round, message type, node and partition, serialised bytes, and per record the
array keys with dtypes and shapes, the config keys and the metric keys; no values), and
with ``wire-payloads = true`` the values themselves to ``wire/<seq>.npz``. This module reads
them back: :func:`summarise` for ``fedkd audit``, :func:`find_history` for the proof that a
device's private interaction sequence never crossed.

How :func:`find_history` looks. A private history is a sequence of item ids; a payload could
carry it as integers of any width, as floats, or bit-packed at ``id_bits(N)`` bits as fedkd
packs ids (:func:`fedkd.codec.pack_ids`). The checker reads every array in each of those ways
and searches the resulting id streams for any run of ``window`` consecutive private items
that does not also occur in the public (cloud) sequences, which the cloud may send. Single
item ids are not evidence (every uint8 code is some item id), a run of ``window`` of them in
the user's own order is: with N items the chance that a random stream of S values contains a
given run is about ``S / (N+1)^window``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fedkd.codec import id_bits


# ----------------------------------------------------------------------------- summary
def read_log(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(lines: Iterable[Mapping]) -> list[dict]:
    """Per (direction, message type): message count, bytes (total, min, max) and the union of
    the array keys with dtypes and shapes, config keys and metric keys seen."""
    groups: dict[tuple[str, str], dict] = {}
    for ln in _per_message(lines):
        g = groups.setdefault((ln["direction"], ln["type"]), {
            "direction": ln["direction"], "type": ln["type"], "messages": 0, "errors": 0, "bytes": 0,
            "bytes_min": None, "bytes_max": 0, "arrays": defaultdict(set), "configs": set(), "metrics": set()})
        count = int(ln.get("count", 1))
        g["messages"] += count
        g["errors"] += 1 if ln.get("error") else 0
        b = int(ln.get("bytes", 0))
        g["bytes"] += b
        if ln.get("per_exchange"):  # an old log: sizes of single messages are unknown
            g["bytes_min"], g["bytes_max"] = "n/a", "n/a"
        elif g["bytes_min"] != "n/a":
            g["bytes_min"] = b if g["bytes_min"] is None else min(g["bytes_min"], b)
            g["bytes_max"] = max(g["bytes_max"], b)
        for rec, keys in ln.get("arrays", {}).items():
            if not keys:
                g["arrays"].setdefault(f"{rec}/*", set()).add("(keys not logged)")
            for k, (dtype, shape) in keys.items():
                g["arrays"][f"{rec}/{k}"].add(f"{dtype}{list(shape)}")
        for rec, keys in ln.get("configs", {}).items():
            g["configs"].update(f"{rec}/{k}" for k in keys)
        for rec, keys in ln.get("metrics", {}).items():
            g["metrics"].update(f"{rec}/{k}" for k in keys)
    out = []
    for key in sorted(groups, key=lambda k: (k[0] != "down", k[1])):
        g = groups[key]
        g["arrays"] = {k: sorted(v) for k, v in sorted(g["arrays"].items())}
        g["configs"], g["metrics"] = sorted(g["configs"]), sorted(g["metrics"])
        out.append(g)
    return out


def _per_message(lines: Iterable[Mapping]) -> Iterable[Mapping]:
    """Lines as written since issue 6 (one per message) pass through; a results folder from an
    older fedkd has one line per exchange (``messages_down``, ``bytes_down``, ``arrays_down``,
    ``replies``, ``bytes_up``, ``arrays_up``), which becomes two aggregate lines with counts."""
    for ln in lines:
        if "direction" in ln:
            yield ln
            continue
        for d, n, b, arrays in (("down", "messages_down", "bytes_down", "arrays_down"),
                                ("up", "replies", "bytes_up", "arrays_up")):
            yield {"direction": d, "type": ln["type"], "count": int(ln.get(n, 0)), "bytes": int(ln.get(b, 0)),
                   "arrays": {name: {} for name in ln.get(arrays, [])}, "per_exchange": True}


def format_summary(rows: Sequence[Mapping], *, max_shapes: int = 3) -> str:
    """Markdown: one table of counts and bytes, then what each kind of message carries."""
    lines = ["| direction | type | messages | errors | MB | bytes min | bytes max |", "|---|---|---|---|---|---|---|"]
    for g in rows:
        lines.append(f"| {g['direction']} | {g['type']} | {g['messages']} | {g['errors']} | {g['bytes'] / 1e6:.3f} "
                     f"| {g['bytes_min']} | {g['bytes_max']} |")
    total = sum(g["bytes"] for g in rows)
    lines.append(f"\nTotal: {sum(g['messages'] for g in rows)} messages, {total / 1e6:.3f} MB.\n")
    for g in rows:
        lines.append(f"**{g['direction']} {g['type']}**")
        for k, shapes in g["arrays"].items():
            more = f" (+{len(shapes) - max_shapes} more shapes)" if len(shapes) > max_shapes else ""
            lines.append(f"- array `{k}`: {', '.join(shapes[:max_shapes])}{more}")
        if g["configs"]:
            lines.append(f"- config: {', '.join(g['configs'])}")
        if g["metrics"]:
            lines.append(f"- metrics: {', '.join(g['metrics'])}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- private histories
def id_streams(a: np.ndarray, num_items: int) -> list[np.ndarray]:
    """The ways an array could carry item ids: its integer values (integers, or floats that are
    whole numbers); its bytes read as little-endian 2-, 4- and 8-byte integers at every
    alignment; and its bits read as ids bit-packed at ``id_bits(num_items)`` bits from every
    bit offset. Values outside 0..num_items are cut out (they end a run)."""
    a = np.asarray(a)
    if a.dtype.kind in "SV":  # a bytes value (secure aggregation's keys and shares): its raw bytes
        a = np.frombuffer(a.tobytes(), np.uint8)
    streams = []
    flat = a.ravel()
    if flat.dtype.kind in "iu" or (flat.dtype.kind == "f" and flat.size and np.all(np.isfinite(flat))
                                   and np.all(flat == np.round(flat))):
        streams.append(flat.astype(np.int64))
    if flat.dtype.kind in "iub" or flat.dtype == np.uint8:
        raw = np.ascontiguousarray(flat).view(np.uint8)
        for width in (2, 4, 8):  # raw bytes of wider little-endian integers, at every alignment
            for off in range(width):
                n = (raw.size - off) // width
                if n > 0:
                    streams.append(raw[off:off + n * width].view(f"<u{width}").astype(np.int64))
        bits = np.unpackbits(raw)
        b = id_bits(num_items)
        weights = (1 << np.arange(b - 1, -1, -1)).astype(np.int64)
        for off in range(b):
            n = (bits.size - off) // b
            if n > 0:
                streams.append(bits[off:off + n * b].reshape(n, b).astype(np.int64) @ weights)
    return [np.where((s >= 0) & (s <= num_items), s, -1) for s in streams]


def ngrams(seqs: Iterable[np.ndarray], n: int) -> set[tuple[int, ...]]:
    out: set[tuple[int, ...]] = set()
    for s in seqs:
        s = np.asarray(s, np.int64)
        for i in range(len(s) - n + 1):
            out.add(tuple(int(x) for x in s[i:i + n]))
    return out


def find_history(arrays: Mapping[str, np.ndarray], private: Mapping[int, np.ndarray], *, num_items: int,
                 public: Iterable[np.ndarray] = (), window: int = 6) -> list[dict]:
    """Every place where a run of ``window`` consecutive items of a private history (one per
    user id in ``private``), absent from every ``public`` sequence, appears in ``arrays``
    read as id streams (:func:`id_streams`). Returns findings (array name, user, position)."""
    public_grams = ngrams(public, window)
    owner: dict[tuple[int, ...], int] = {}
    for user, seq in private.items():
        for g in ngrams([seq], window) - public_grams:
            owner.setdefault(g, int(user))
    if not owner:
        return []
    grams = np.array(list(owner), dtype=np.int64)
    table = dict(zip(_hash(grams).tolist(), owner.values()))
    keys = np.fromiter(table, dtype=np.uint64, count=len(table))
    findings = []
    for name, a in arrays.items():
        for si, stream in enumerate(id_streams(a, num_items)):
            if stream.size < window:
                continue
            view = np.lib.stride_tricks.sliding_window_view(stream, window)
            h = _hash(view)
            hit = np.isin(h, keys) & np.all(view > 0, axis=1)  # padding (0) and non-ids (-1) end a run
            for pos in np.flatnonzero(hit):
                g = tuple(int(x) for x in view[pos])
                if g in owner:  # the hash only narrows the search; the run itself must match
                    findings.append({"array": name, "stream": si, "position": int(pos), "user": owner[g]})
    return findings


def _hash(rows: np.ndarray) -> np.ndarray:
    """A polynomial hash of each row (uint64, wrapping): one vectorised pass over a stream."""
    h = np.zeros(rows.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows.shape[1]):
            h = h * np.uint64(1_000_003) + (rows[:, j].astype(np.int64) + 1).astype(np.uint64)
    return h
