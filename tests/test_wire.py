"""Flower packing: round trips, and byte counts that track the payload."""

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from wire import Content, describe, garble, message_nbytes, message_payload, pack, unpack


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _content(n: int) -> Content:
    return Content(arrays={"student": {"codes": np.arange(n, dtype=np.uint8) % 251,
                                       "scale": np.ones(3, np.float32)}},
                   configs={"config": {"round": 3, "split": "valid"}},
                   metrics={"metrics": {"num-examples": 12, "loss": 0.5}})


def test_pack_unpack_round_trip():
    c = _content(100)
    back = unpack(pack(c))
    assert back.configs == c.configs and back.metrics == c.metrics
    for k, v in c.arrays["student"].items():
        assert back.arrays["student"][k].dtype == v.dtype
        assert np.array_equal(back.arrays["student"][k], v)
    assert describe(back) == {"student": [["codes", "uint8", [100]], ["scale", "float32", [3]]]}


def test_message_bytes_grow_with_the_payload_byte_for_byte_plus_small_framing():
    small = message_nbytes(Message(pack(_content(1_000)), dst_node_id=2, message_type="train"))
    big = message_nbytes(Message(pack(_content(101_000)), dst_node_id=2, message_type="train"))
    assert 100_000 <= big - small < 100_000 + 1_000  # chunk framing only
    assert small > 1_000


def test_byte_counts_do_not_depend_on_flowers_random_ids():
    """Node and run ids are random per run; counting them at full width keeps byte counts (and
    the deadline plans made from them) identical for the same seed."""
    sizes = set()
    for node, run in ((1, 1), (2**63 + 12345, 2**62), (987654321, 2**64 - 1)):
        TaskIdentity.run_id = run
        sizes.add(message_nbytes(Message(pack(_content(1_000)), dst_node_id=node, message_type="train")))
    assert len(sizes) == 1
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    raw = sum(len(o.deflate()) for o in get_all_nested_objects(
        Message(pack(_content(1_000)), dst_node_id=2**64 - 1, message_type="train")).values())
    assert 0 <= sizes.pop() - raw <= 5 * 9  # the real serialisation, the 5 ids at worst-case width


def test_a_garbled_array_is_saved_as_raw_bytes_not_a_crash():
    """With wire-payloads on, an undecodable reply (fault-corrupt-kinds undecodable) stopped the
    ServerApp in the audit, before the server could reject it."""
    msg = Message(garble(pack(_content(10)), "student"), dst_node_id=2, message_type="train")
    payload = message_payload(msg)
    assert not [k for k in payload if k.startswith("array:")]
    raw = payload["undecodable:student/codes"]
    assert raw.dtype == np.uint8 and raw.tobytes().startswith(b"\x93NUMPY-garbled")
    assert payload["metric:metrics/num-examples"] == 12
