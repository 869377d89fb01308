"""Flower's pause before it asks again for an object that is not there yet, shortened.

Flower 1.41 moves a message as a tree of objects (its records and arrays), each fetched with a
request of its own (``pull_objects`` in ``flwr.supercore.inflatable.inflatable_utils``, also
behind its ``pull_and_inflate_object_from_tree``). A receiver often asks before the sender has
pushed them all: a SuperNode is handed a message as soon as the ServerApp has announced it, a
ClientApp its task as soon as the SuperNode has created it (before the SuperNode has the
message's content), the ServerApp a reply as soon as the SuperNode has announced it. The
receiver then waits 1 s, 2 s, 4 s ... (at most 10 s) between tries, and may ask again only
seconds after the content arrived: on loopback, where the rest of an exchange takes a fraction
of a second, that wait was most of what was left once the processes and the polls were fast
(docs/devices.md). :func:`shorten_object_pulls` starts the backoff at ``initial`` seconds in
this process and caps it at ``cap``; the tries allowed grow so that a slow sender is waited
for as long as before (tries x cap = Flower's 500 x 10 s; its 2 h limit stays). Installed
only for the flwr version it was read from.

``simulations/clientapp_worker.py`` does the same for its own process without importing this
package (it must import nothing of the app it runs); a test keeps the two equal.
"""

from __future__ import annotations

FLWR_VERSION = "1.41.0"
INITIAL_BACKOFF = 0.05  # seconds before the first retry
BACKOFF_CAP = 0.5  # seconds between tries at most
FLOWER_INITIAL_BACKOFF, FLOWER_BACKOFF_CAP, FLOWER_TRIES = 1.0, 10.0, 500  # flwr.supercore.constant's PULL_*


def shorten_object_pulls(initial: float = INITIAL_BACKOFF, cap: float = BACKOFF_CAP) -> bool:
    """Retry Flower's object pulls after ``initial`` seconds, then at most every ``cap``; True if installed."""
    import math

    import flwr
    from flwr.supercore.inflatable import inflatable_utils
    if getattr(flwr, "__version__", "") != FLWR_VERSION:
        return False
    tries = math.ceil(FLOWER_TRIES * FLOWER_BACKOFF_CAP / cap)  # as patient as Flower
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        # the second passes its own defaults to the first
        fn.__kwdefaults__.update(initial_backoff=initial, backoff_cap=cap, max_tries_per_object=tries)
    return True
