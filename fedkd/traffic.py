"""Training traffic by content, per round and cumulative: the meter behind metrics.csv's
``bytes_down_*`` / ``bytes_up_*`` columns.

The counts themselves come from the serialised Flower messages
(:func:`wire.message_nbytes_by_part`); this module only names what each record of a
fedkd message is and adds the counts up, so the parts of a round always sum to its
``bytes_down`` and ``bytes_up``.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Columns, in the order they appear. ``envelope`` is Flower's own framing of a message (its
#: metadata and the names of its records); ``config`` and ``metrics`` the scalar records;
#: ``keys`` the public keys of secure aggregation (docs/privacy.md), 0 without it.
DOWN_PARTS = ("student", "proxy_inputs", "soft_labels", "config", "keys", "envelope")
UP_PARTS = ("update", "soft_labels", "metrics", "keys", "envelope")

_RECORD_PART = {"student": "student", "next": "proxy_inputs", "config": "config", "update": "update",
                "preds": "soft_labels", "metrics": "metrics", "masked": "update", "peers": "keys",
                "secagg": "keys", "fingerprint": "metrics"}  # fingerprint: the handshake's (fedkd.shards)
_PROXY_INPUTS = {"histories", "rows", "hist-mask"}  # the rest of a "proxy" record is soft labels


def part_of(record: str, key: str | None) -> str:
    """The content a record (or one array of it, ``key``) of a fedkd message is.

    A train message's ``proxy`` record holds both the proxy histories (and, with caching, row
    numbers and the mask of histories sent) and the soft labels on them; it is split by array.
    """
    if record == "proxy":
        return "proxy_inputs" if key in _PROXY_INPUTS else "soft_labels"
    try:
        return _RECORD_PART[record]
    except KeyError:
        raise ValueError(f"record '{record}' has no traffic part; add it to fedkd.traffic") from None


class TrafficMeter:
    """Sums message parts per direction for the current round, and over the run."""

    def __init__(self) -> None:
        self.round = {"down": {}, "up": {}}
        self.total = {"down": {}, "up": {}}

    def add(self, direction: str, parts: Mapping[str, int]) -> None:
        allowed = DOWN_PARTS if direction == "down" else UP_PARTS
        for part, n in parts.items():
            if part not in allowed:
                raise ValueError(f"unknown {direction} traffic part '{part}' (allowed: {', '.join(allowed)})")
            self.round[direction][part] = self.round[direction].get(part, 0) + int(n)

    def close_round(self) -> dict[str, int]:
        """This round's columns and the cumulative ones; starts the next round."""
        row = {}
        for direction, parts in (("down", DOWN_PARTS), ("up", UP_PARTS)):
            for part in parts:
                n = self.round[direction].get(part, 0)
                self.total[direction][part] = self.total[direction].get(part, 0) + n
                row[f"bytes_{direction}_{part}"] = n
        for direction, parts in (("down", DOWN_PARTS), ("up", UP_PARTS)):
            for part in parts:
                row[f"cum_bytes_{direction}_{part}"] = self.total[direction].get(part, 0)
        self.round = {"down": {}, "up": {}}
        return row
