"""One pass per sweep instead of one per node: the simulation engine's message dispatcher.

Flower 1.41's simulation engine hands messages to its workers from a thread
(``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the in-memory LinkState for the
next message of *each node in the fleet*; each such call scans *every stored message* and
re-checks each one's expiry and federation membership. A sweep therefore costs
nodes x messages checks: with the full MovieLens-100K fleet (754 nodes, 754 messages in a
round) that is ~570,000 checks every 0.1 s, a core's worth of work on a 2-core machine that
the training workers then lack (docs/performance.md measured the clients' local training
2.3x slower inside the simulation than in a bare loop for this reason), and with 10,000
nodes a handshake would never finish.

:func:`add_messages_to_queue` keeps Flower's semantics (per sweep, at most one message per
node, the first undelivered one in store order; expired or out-of-federation messages
removed by Flower's own check; marked delivered under the state's lock) in one pass over the
stored messages. It is installed only for the in-memory LinkState of the flwr version it was
written against; anything else keeps Flower's own function.
"""

from __future__ import annotations

import logging
import threading
from queue import Queue

FLWR_VERSION = "1.41.0"  # the internals below were read from this version's sources
log = logging.getLogger("fedkd")


def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Drop-in for ``flwr...vce_api.add_messages_to_queue`` (same arguments, same effect)."""
    from flwr.supercore.date import now
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not isinstance(state, InMemoryLinkState):
        return _ORIGINAL(state, queue, nodes_mapping, f_stop)
    nodes = set(nodes_mapping.keys())
    while not f_stop.is_set():
        with state.lock:
            pending = [i for i, m in state.message_ins_store.items()
                       if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes]
        batch = []
        if pending:
            state._check_stored_messages(set(pending))  # Flower's expiry and federation check
            with state.lock:
                served, stamp = set(), now().isoformat()
                for i in pending:
                    m = state.message_ins_store.get(i)
                    if m is None or m.metadata.delivered_at != "" or m.metadata.dst_node_id in served:
                        continue
                    served.add(m.metadata.dst_node_id)  # one per node per sweep, as Flower does
                    m.metadata.delivered_at = stamp
                    batch.append(m)
        for m in batch:
            queue.put(m)
        f_stop.wait(0.1)
    return None


_ORIGINAL = None


def install() -> bool:
    """Use :func:`add_messages_to_queue` in this process's simulation engine; True if installed."""
    global _ORIGINAL
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    version = getattr(flwr, "__version__", "")
    if version != FLWR_VERSION:
        log.info("flwr %s: keeping Flower's own message dispatcher (fedkd's is for %s)", version, FLWR_VERSION)
        return False
    if vce_api.add_messages_to_queue is not add_messages_to_queue:
        _ORIGINAL = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue
    return True
