"""The only module that knows Flower's message format: numpy dicts <-> Flower records, and byte counts.

A message's content is a RecordDict of named ArrayRecords (numpy arrays under named
keys), ConfigRecords (settings the receiver must follow) and MetricRecords (numbers it
reports). Bytes on the wire are measured as Flower sends them: the serialised
(deflated) bytes of every object in the message's object tree, the unit in which Flower
1.4x pushes messages through its object store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedkd.codec import PayloadError

Arrays = dict[str, np.ndarray]


@dataclass
class Content:
    """Plain-python view of a message's content."""

    arrays: dict[str, Arrays] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> Arrays:
    return {k: arr.numpy() for k, arr in rec.items()}


def pack(content: Content) -> RecordDict:
    rd = RecordDict()
    for name, arrays in content.arrays.items():
        rd[name] = to_record(arrays)
    for name, cfg in content.configs.items():
        rd[name] = ConfigRecord(dict(cfg))
    for name, met in content.metrics.items():
        rd[name] = MetricRecord(dict(met))
    return rd


def unpack(rd: RecordDict) -> Content:
    """Decode a RecordDict; an undecodable array raises PayloadError ('undecodable') with the key."""
    out = Content()
    for name, rec in rd.array_records.items():
        arrays = {}
        for key, arr in rec.items():
            try:
                arrays[key] = arr.numpy()
            except Exception as exc:  # noqa: BLE001 - any decode failure is the sender's fault
                raise PayloadError("undecodable", f"array '{name}/{key}' cannot be decoded: {exc}") from None
        out.arrays[name] = arrays
    out.configs = {name: dict(rec) for name, rec in rd.config_records.items()}
    out.metrics = {name: dict(rec) for name, rec in rd.metric_records.items()}
    return out


def garble(rd: RecordDict, name: str) -> RecordDict:
    """Replace the bytes of every array in record ``name`` with bytes that are no ``.npy`` file,
    keeping its declared dtype and shape: the 'undecodable' fault a flaky radio or a buggy
    client produces, injected where it really happens, below the numpy level."""
    rec = rd[name]
    for key in list(rec.keys()):
        arr = rec[key]
        rec[key] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype,
                         data=b"\x93NUMPY-garbled" + bytes(len(arr.data)))
    return rd


# Integer ids (run, source and destination node, tasks) are random per run and serialise as
# varints of 1-10 bytes; a message is counted with each at its full 10-byte width.
_ID_FIELDS = ("run_id", "src_node_id", "dst_node_id", "src_task_id", "dst_task_id")


def message_nbytes(msg: Message) -> int:
    """Serialised size of a message: every object Flower would push, summed.

    The message object itself (its metadata) is counted with every random integer id at
    full width and a non-zero timestamp, so the count depends on the content only: the same
    seed gives the same byte counts, and byte-driven decisions (how many local steps fit a
    deadline) cannot differ between two runs because Flower drew other node ids.
    """
    total = 0
    for obj in get_all_nested_objects(msg).values():
        total += _canonical_nbytes(obj) if isinstance(obj, Message) else len(obj.deflate())
    return total


def _canonical_nbytes(msg: Message) -> int:
    from flwr.common.serde_utils import error_to_proto, metadata_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: N811 - Flower's own name
    from flwr.supercore.inflatable.inflatable_object import add_header_to_object_body

    md = metadata_to_proto(msg.metadata)
    md.message_id = ""  # as in Message.deflate
    for name in _ID_FIELDS:
        if getattr(md, name):  # an id that is set, whatever Flower drew; an unset one stays absent
            setattr(md, name, 2**64 - 1)
    md.created_at = 1.0
    body = ProtoMessage(metadata=md, content=None, error=error_to_proto(msg.error) if msg.has_error() else None
                        ).SerializeToString(deterministic=True)
    return len(add_header_to_object_body(object_body=body, obj=msg))


def message_nbytes_by_part(msg: Message, part_of: Callable[[str, str | None], str]) -> dict[str, int]:
    """:func:`message_nbytes` split by content; the parts sum to it exactly.

    Flower serialises a Message as a tree of objects, each deflated to bytes on its own
    (``Message`` -> ``RecordDict`` -> records -> ``Array`` -> ``ArrayChunk``) and pushed once per
    distinct object id (identical objects, e.g. two all-zero chunks, travel once). Every
    distinct object is charged to one part: an Array and its chunks to
    ``part_of(record, array key)``, a record's own object (its key -> id map, or a config or
    metric record's values) to ``part_of(record, None)``, and the Message (metadata) and
    RecordDict (record names) objects to ``"envelope"``. An object that occurs twice is
    charged where it occurs first, in Flower's own (post-order) traversal. The Message object
    is counted as :func:`message_nbytes` counts it (random ids at full width).
    """
    out: dict[str, int] = {}
    seen: set[str] = set()

    def charge(obj, part: str, *, with_children: bool) -> None:
        objs = get_all_nested_objects(obj) if with_children else {obj.object_id: obj}
        for oid, o in objs.items():
            if oid not in seen:
                seen.add(oid)
                out[part] = out.get(part, 0) + (_canonical_nbytes(o) if isinstance(o, Message) else len(o.deflate()))

    if msg.has_content():
        for name, rec in msg.content.items():
            if isinstance(rec, ArrayRecord):
                for key, arr in rec.items():
                    charge(arr, part_of(name, key), with_children=True)
            charge(rec, part_of(name, None), with_children=False)
        charge(msg.content, "envelope", with_children=False)
    charge(msg, "envelope", with_children=False)
    return out


def describe(content: Content) -> dict[str, list]:
    """Keys, dtypes and shapes of the arrays (for logs and audits), no values."""
    return {name: [[k, str(v.dtype), list(v.shape)] for k, v in arrays.items()]
            for name, arrays in content.arrays.items()}


def config_of(content: Content, name: str, key: str, kinds: type | tuple[type, ...]) -> object:
    """A required config value, type-checked, so a malformed message fails with its key."""
    try:
        value = content.configs[name][key]
    except KeyError:
        raise ValueError(f"message lacks config '{name}/{key}'") from None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"config '{name}/{key}' has type {type(value).__name__}")
    return value


def metric_dict(values: Mapping[str, float | int]) -> dict[str, float | int]:
    return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in values.items()}


def describe_message(msg: Message) -> dict:
    """What an audit needs of one message, values left out: its type, and per record the array
    keys with dtype and shape, the config keys with their Python type, the metric keys."""
    rd = msg.content
    return {
        "type": msg.metadata.message_type,
        "arrays": {name: {k: [str(a.dtype), list(a.shape)] for k, a in rec.items()}
                   for name, rec in rd.array_records.items()},
        "configs": {name: {k: type(v).__name__ for k, v in rec.items()} for name, rec in rd.config_records.items()},
        "metrics": {name: sorted(rec.keys()) for name, rec in rd.metric_records.items()},
    }


def message_payload(msg: Message) -> dict[str, np.ndarray]:
    """Every value a message carries, as arrays named ``array:<record>/<key>``,
    ``config:<record>/<key>`` and ``metric:<record>/<key>`` (scalars as 0-d arrays), for
    saving with ``np.savez`` and auditing what actually crossed. An array whose bytes are no
    ``.npy`` file (a garbled reply) is kept as raw bytes, ``undecodable:<record>/<key>``: the
    audit must record it, and the server rejects it later with its own reason."""
    rd, out = msg.content, {}
    for name, rec in rd.array_records.items():
        for k, a in rec.items():
            try:
                out[f"array:{name}/{k}"] = a.numpy()
            except Exception:  # noqa: BLE001 - whatever np.load makes of foreign bytes
                out[f"undecodable:{name}/{k}"] = np.frombuffer(a.data, np.uint8).copy()
    for kind, records in (("config", rd.config_records), ("metric", rd.metric_records)):
        for name, rec in records.items():
            for k, v in rec.items():
                out[f"{kind}:{name}/{k}"] = np.asarray(v)
    return out
