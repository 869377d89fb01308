"""Device shards and the fleet fingerprint: what a device holds, and how the server knows it is right.

Without shards every party loads the whole interaction file and derives the population from
it, so every device can read every user's history. ``fedkd shard`` (and ``fedkd deploy local
--shards``) instead writes, per edge partition, a folder ``device-<i>/`` that a device can
run from alone:

- ``histories.npz``: that partition's users only: their internal indices (``users``), original
  ids (``user_ids``) and chronological internal item ids (``items``, cut by ``offsets``);
- ``manifest.json``: the partition id, the fleet size, the catalogue size (all a device needs
  to build its model), the settings the population was cut with, and the **fingerprint**.

The fingerprint has three parts, each a SHA-256:

- ``data``: the whole dataset after loading (:meth:`fedkd.data.Dataset.fingerprint`: catalogue
  size and every history), so two copies of the data agree exactly when training would;
- ``config``: the settings that cut the dataset into cloud users and clients
  (:data:`PARTITION_KEYS`), as canonical JSON (sent along, so a refusal can say which differs);
- ``partition``: this partition's users and their histories. A device recomputes it from the
  histories it loaded, so an altered or half-copied shard is caught on the device itself.

At the handshake each device sends its fingerprint; the server computes the one it expects
for that partition from its own data and settings and refuses a device whose fingerprint
differs, whose partition id is outside the fleet, or whose partition another device already
holds (:func:`admit`), with the reason in ``rejections.jsonl``. A device that loads the whole
file computes the same fingerprint, so the check covers both layouts.

The partition digest is a hash of private histories. It tells the server nothing it could not
compute itself: in fedkd the shards are cut where the whole file is, and the server checks the
digest against a copy it made from the same data. No Flower import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkd.config import ExperimentConfig

__all__ = ["Claim", "Fingerprint", "HANDSHAKE_REASONS", "PARTITION_KEYS", "Refusal", "Shard", "admit",
           "fingerprint", "load_shard", "mismatch", "partition_digest", "partition_settings", "write_shards"]

FORMAT = "fedkd-shard/1"
MANIFEST = "manifest.json"
HISTORIES = "histories.npz"
#: The settings that cut a loaded dataset into cloud users and clients (fedkd.split); with the
#: data hash they fix every partition. Tiers, windows and the like are the run config's, not a shard's.
PARTITION_KEYS = ("cloud-fraction", "users-per-client", "seed")

#: Why the server refused a node at the handshake (``rejections.jsonl``: round 0, type "query").
HANDSHAKE_REASONS: dict[str, str] = {
    "crashed": "the device raised instead of answering the handshake (e.g. no partition-id, a broken shard)",
    "timeout": "no handshake reply within handshake-timeout (e.g. a device out of memory before it could reply)",
    "fingerprint": "the device's data, settings or partition differ from the server's (its fingerprint)",
    "partition": "the device claims a partition id outside this fleet",
    "duplicate": "another device already holds this partition (the one with the lowest node id is kept)",
}


# --------------------------------------------------------------------------- the fingerprint
@dataclass(frozen=True)
class Fingerprint:
    """What a device's data is: data hash, config digest (with the settings it is over), partition digest."""

    data: str
    config: str
    partition: str
    settings: str = ""  # canonical JSON of PARTITION_KEYS, what ``config`` hashes

    @property
    def fleet(self) -> str:
        """The part every device of one fleet shares (data and settings), 16 hex digits."""
        return hashlib.sha256(f"fedkd.fleet.v1:{self.data}:{self.config}".encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, str]:
        return {"fleet": self.fleet, "data": self.data, "config": self.config, "partition": self.partition,
                "settings": self.settings}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Fingerprint:
        """From a manifest or a handshake reply; a missing part raises ValueError naming it."""
        missing = [k for k in ("data", "config", "partition") if not isinstance(d.get(k), str)]
        if missing:
            raise ValueError(f"fingerprint without {', '.join(missing)}")
        return cls(data=str(d["data"]), config=str(d["config"]), partition=str(d["partition"]),
                   settings=str(d.get("settings", "")))


def partition_settings(cfg: ExperimentConfig) -> str:
    """Canonical JSON of the settings in :data:`PARTITION_KEYS` (typed, so 0 and 0.0 agree)."""
    values = {"cloud-fraction": float(cfg.cloud_fraction), "users-per-client": int(cfg.users_per_client),
              "seed": int(cfg.seed)}
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def _config_digest(settings: str) -> str:
    return hashlib.sha256(b"fedkd.partition-settings.v1:" + settings.encode()).hexdigest()


def partition_digest(partition_id: int, users: np.ndarray, sequences: Sequence[np.ndarray]) -> str:
    """SHA-256 of one partition: its id, its users (internal indices) and their histories, in order."""
    users = np.asarray(users, dtype="<i8")
    if len(users) != len(sequences):
        raise ValueError(f"{len(users)} users for {len(sequences)} histories")
    lengths = np.fromiter((len(s) for s in sequences), dtype="<i8", count=len(sequences))
    items = np.concatenate(sequences).astype("<i8", copy=False) if len(sequences) else np.zeros(0, "<i8")
    h = hashlib.sha256(b"fedkd.partition.v1")
    h.update(np.asarray([partition_id, len(users)], dtype="<i8").tobytes())
    h.update(users.tobytes())
    h.update(lengths.tobytes())
    h.update(items.tobytes())
    return h.hexdigest()


def fingerprint(cfg: ExperimentConfig, pop, partition_id: int) -> Fingerprint:
    """The fingerprint of partition ``partition_id`` of a population (:mod:`fedkd.population`),
    as the server expects it and as a device that loads the whole file computes it."""
    users = pop.clients[partition_id]
    settings = partition_settings(cfg)
    return Fingerprint(data=pop.data_hash, config=_config_digest(settings), settings=settings,
                       partition=partition_digest(partition_id, users, [pop.dataset.sequences[u] for u in users]))


def mismatch(expected: Fingerprint, reported: Fingerprint | None, partition_id: int) -> str | None:
    """Why ``reported`` is not the fingerprint expected of partition ``partition_id``; None if it is."""
    if reported is None:
        return "it sent no fingerprint"
    if reported.data != expected.data:
        return (f"its data hash {reported.data[:12]} is not the server's {expected.data[:12]}: its data (shard or "
                "copy of the interaction file) comes from other interactions; give it a shard cut from the "
                "server's data (fedkd shard)")
    if reported.config != expected.config:
        theirs = f"its shard was cut with {reported.settings}" if reported.settings else "its settings differ"
        return (f"its config digest {reported.config[:12]} is not the server's {expected.config[:12]}: {theirs}, "
                f"this run uses {expected.settings}; cut the shards again with this run's settings")
    if reported.partition != expected.partition:
        return (f"its partition digest {reported.partition[:12]} is not that of partition {partition_id} "
                f"({expected.partition[:12]}): it holds other users' histories than partition {partition_id}'s "
                "(another device's shard, or an altered one)")
    return None


@dataclass(frozen=True)
class Claim:
    """What a node said at the handshake."""

    node_id: int
    partition_id: int
    fingerprint: Fingerprint | None


@dataclass(frozen=True)
class Refusal:
    node_id: int
    partition_id: int | None
    reason: str  # a key of HANDSHAKE_REASONS
    detail: str


def admit(claims: Iterable[Claim], *, num_partitions: int,
          expected: Callable[[int], Fingerprint]) -> tuple[list[Claim], list[Refusal]]:
    """The nodes the server trains with, and the ones it refuses with their reasons.

    Claims are judged in (partition id, node id) order, so the outcome never depends on the
    order replies arrived in: a partition id outside ``0..num_partitions-1`` is refused
    (``partition``), then a fingerprint other than ``expected(partition id)`` (``fingerprint``),
    then a second matching node for a partition already admitted (``duplicate``).
    """
    admitted, refused, holder = [], [], {}
    for c in sorted(claims, key=lambda c: (c.partition_id, c.node_id)):
        pid = c.partition_id
        if not 0 <= pid < num_partitions:
            refused.append(Refusal(c.node_id, pid, "partition",
                                   f"partition-id {pid} is outside 0..{num_partitions - 1}: this fleet has "
                                   f"{num_partitions} clients"))
        elif (why := mismatch(expected(pid), c.fingerprint, pid)) is not None:
            refused.append(Refusal(c.node_id, pid, "fingerprint", f"partition {pid}: {why}"))
        elif pid in holder:
            refused.append(Refusal(c.node_id, pid, "duplicate",
                                   f"partition {pid} is already held by node {holder[pid]}"))
        else:
            holder[pid] = c.node_id
            admitted.append(c)
    return admitted, refused


# --------------------------------------------------------------------------- shards on disk
@dataclass(frozen=True)
class Shard:
    """One device's shard, loaded and checked against its manifest."""

    path: Path
    partition_id: int
    num_partitions: int
    num_items: int
    users: np.ndarray  # (U,) internal user indices, the population's order
    user_ids: np.ndarray  # (U,) original user ids
    sequences: tuple[np.ndarray, ...]  # per user: (len_u,) internal item ids 1..num_items, chronological
    fingerprint: Fingerprint


def write_shards(cfg: ExperimentConfig, pop, out: Path, *, replace: bool = False) -> list[Path]:
    """Write ``out/device-<i>/`` for every edge partition of ``pop``; returns the folders.

    Each holds only partition i's users' histories and a manifest. Existing shards in ``out``
    are refused unless ``replace`` (then they are removed first, so no stale device folder of a
    bigger fleet stays behind).
    """
    out = Path(out)
    old = sorted(out.glob("device-*")) if out.is_dir() else []
    if old and not replace:
        raise ValueError(f"{out} already holds shards ({old[0].name}, ...); choose another folder, or replace them (fedkd shard --force)")
    for d in old:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    settings = partition_settings(cfg)
    folders = []
    for pid, users in enumerate(pop.clients):
        seqs = [pop.dataset.sequences[u] for u in users]
        fp = fingerprint(cfg, pop, pid)
        d = out / f"device-{pid}"
        d.mkdir()
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        with open(d / HISTORIES, "wb") as f:
            np.savez(f, users=np.asarray(users, np.int64), user_ids=np.asarray(pop.dataset.user_ids[users]),
                     offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     items=(np.concatenate(seqs) if seqs else np.zeros(0)).astype(np.int64))
        manifest = {"format": FORMAT, "partition-id": pid, "num-partitions": pop.num_clients,
                    "num-items": int(pop.dataset.num_items), "users": len(users),
                    "interactions": int(lengths.sum()), "settings": json.loads(settings),
                    "fingerprint": fp.as_dict(), "source": pop.dataset.source, "files": [HISTORIES]}
        tmp = d / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, d / MANIFEST)
        folders.append(d)
    return folders


def load_shard(path: str | os.PathLike) -> Shard:
    """Read a device's shard and check its histories against its manifest (ValueError if they differ)."""
    path = Path(path).expanduser()
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"no shard at {path}: {MANIFEST} is missing; write shards with `fedkd shard --out DIR` "
                         "and give each device its DIR/device-<i>") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"shard {path}: {MANIFEST} is not JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"shard {path}: format {manifest.get('format')!r}, this fedkd reads {FORMAT!r}")
    try:
        with np.load(path / HISTORIES, allow_pickle=False) as z:
            users, user_ids, offsets, items = (z[k] for k in ("users", "user_ids", "offsets", "items"))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"shard {path}: cannot read {HISTORIES} ({exc}); copy the shard again") from None
    pid = int(manifest["partition-id"])
    seqs = tuple(items[offsets[i]:offsets[i + 1]] for i in range(len(users)))
    fp = Fingerprint.from_dict(manifest["fingerprint"])
    if partition_digest(pid, users, seqs) != fp.partition:
        raise ValueError(f"shard {path}: its histories do not match its manifest (partition digest); it was "
                         "altered or only partly copied: copy it again")
    for a in (users, user_ids, items, *seqs):
        a.flags.writeable = False
    return Shard(path=path, partition_id=pid, num_partitions=int(manifest["num-partitions"]),
                 num_items=int(manifest["num-items"]), users=users, user_ids=user_ids, sequences=seqs,
                 fingerprint=fp)
