"""fedkd's simulation dispatcher hands out exactly what Flower's own would, sweep by sweep
(simulations/fast_dispatch.py), only in one pass over the stored messages."""

import threading
from queue import Queue
from types import SimpleNamespace

import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from simulations import fast_dispatch


class Sweeps:
    """An Event that lets the dispatcher's loop run ``n`` sweeps."""

    def __init__(self, n):
        self.left = n

    def is_set(self):
        self.left -= 1
        return self.left < 0

    def wait(self, _):
        return False


def _state(msgs):
    state = object.__new__(InMemoryLinkState)  # the attributes both dispatchers read, nothing else
    state.lock = threading.RLock()
    state.message_ins_store = {m.metadata.message_id: m for m in msgs}
    state.checked = []

    def check(ids, run_id=None):  # Flower's expiry check: here message "x" has expired
        state.checked.append(set(ids))
        for i in list(ids):
            if i == "x" and i in state.message_ins_store:
                del state.message_ins_store[i]
    state._check_stored_messages = check
    return state


def _msgs():
    spec = [("a", 1), ("b", 2), ("c", 1), ("x", 3), ("d", 9), ("e", 2), ("f", 3), ("g", 1)]
    return [SimpleNamespace(metadata=SimpleNamespace(message_id=i, dst_node_id=n, run_id=7, delivered_at=""))
            for i, n in spec]


def _run(fn, sweeps):
    state, queue = _state(_msgs()), Queue()
    fn(state, queue, {1: 0, 2: 1, 3: 2}, Sweeps(sweeps))
    return [queue.get().metadata.message_id for _ in range(queue.qsize())]


@pytest.mark.parametrize("sweeps", [1, 2, 3, 4])
def test_same_messages_as_flowers_dispatcher_after_each_sweep(sweeps):
    ours = _run(fast_dispatch.add_messages_to_queue, sweeps)
    flowers = _run(vce_api.add_messages_to_queue if vce_api.add_messages_to_queue is not
                   fast_dispatch.add_messages_to_queue else fast_dispatch._ORIGINAL, sweeps)
    assert sorted(ours) == sorted(flowers)
    assert "x" not in ours and "d" not in ours  # expired; node 9 is not in this simulation


def test_one_message_per_node_per_sweep_first_in_store_order():
    assert sorted(_run(fast_dispatch.add_messages_to_queue, 1)) == ["a", "b", "f"]
    assert sorted(_run(fast_dispatch.add_messages_to_queue, 2)) == ["a", "b", "c", "e", "f"]


def test_install_replaces_the_engines_function_for_the_pinned_flower():
    assert fast_dispatch.install() is True
    assert vce_api.add_messages_to_queue is fast_dispatch.add_messages_to_queue
    assert fast_dispatch._ORIGINAL is not None and fast_dispatch._ORIGINAL is not fast_dispatch.add_messages_to_queue
