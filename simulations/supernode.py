"""``flower-supernode`` with a shorter idle poll: how ``fedkd deploy local`` starts its SuperNodes.

    python -m simulations.supernode --poll 0.1 <any flower-supernode arguments>

A flwr 1.41 SuperNode (``flwr/supernode/start_client_internal.py``) asks the SuperLink for a
message and, when there is none, sleeps a fixed 3 s before asking again; while its ClientApp
works, it looks for the reply every 0.5 s. Neither is a setting. On a fleet that is idle
between exchanges (every SuperNode, between one round's validation and the next round's
training) the 3 s alone adds 1.5 s on average to every exchange, and the last node to look
sets the exchange's time. This launcher runs Flower's own ``flower-supernode`` entry point, with
the same arguments, in this process, after replacing the ``time`` module *of that one Flower
module* by a :class:`Clock`: after a message, the SuperNode asks again ``--poll`` seconds
later, and each time nothing came it waits twice as long, up to ``--poll-cap`` (1 s), so an
idle fleet costs the SuperLink about one request per node and second instead of ten; the
checks for the ClientApp's reply wait at most ``--poll``. Every other call and module is
Flower's. It also starts Flower's retries for a message whose content is not all there yet
at 0.05 s instead of 1 s (:mod:`wire.waits`). ``--poll 3`` (or more) changes nothing.
Installed only for the flwr version it was read from (:data:`FLWR_VERSION`); with another,
the SuperNode runs unchanged.

With ``FEDKD_PROFILE_DIR`` set (:mod:`fedkd.timeline`) it also records, per message, when the
SuperNode took it from the SuperLink, when it had pulled its content, and when it picked up
the reply to send.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from fedkd import timeline
from wire.waits import shorten_object_pulls

FLWR_VERSION = "1.41.0"
FLOWER_IDLE_S = 3.0  # what start_client_internal sleeps when the SuperLink has no message for it
POLL_CAP = 1.0  # the longest idle sleep of the Clock
log = logging.getLogger("fedkd")


class Clock:
    """Stands in for the ``time`` module inside one Flower module.

    An idle sleep (Flower's 3 s: the SuperLink had no message) lasts ``poll`` seconds after
    :meth:`busy` (a message came), then twice as long each time, up to ``cap``; any other
    sleep (the 0.5 s checks for the ClientApp's reply, inside the process) at most ``poll``.
    """

    def __init__(self, poll: float, cap: float = POLL_CAP) -> None:
        self.poll, self.cap = poll, max(cap, poll)
        self.idle = poll

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_S:
            time.sleep(self.idle)
            self.idle = min(2 * self.idle, self.cap)
        else:
            time.sleep(min(seconds, self.poll))

    def busy(self) -> None:
        self.idle = self.poll

    def __getattr__(self, name: str):
        return getattr(time, name)


def install(poll: float, cap: float = POLL_CAP) -> Clock | None:
    """Shorten the SuperNode's sleeps in this process; the Clock, or None if Flower's stay (a
    ``poll`` of 3 s or more, or another flwr version)."""
    import flwr
    from flwr.supernode import start_client_internal as sci
    if getattr(flwr, "__version__", "") != FLWR_VERSION:
        log.warning("flwr %s: the SuperNode keeps its own polling (fedkd's launcher is for %s)",
                    getattr(flwr, "__version__", "?"), FLWR_VERSION)
        return None
    if poll >= FLOWER_IDLE_S:
        return None
    clock = sci.time = Clock(poll, cap)
    pull_and_store = sci._pull_and_store_message

    def pull_and_store_then_wake(**kw):
        run_id = pull_and_store(**kw)
        if run_id is not None:  # a message came: the next one may follow soon
            clock.busy()
        return run_id

    sci._pull_and_store_message = pull_and_store_then_wake
    shorten_object_pulls()  # and retry a message's content not there yet after 0.05 s, not 1 s
    return clock


def trace() -> None:
    """Record when each message was taken, received in full, and answered (profiling only)."""
    from flwr.supernode import start_client_internal as sci
    pull_and_store, push = sci._pull_and_store_message, sci._push_messages

    def traced_pull_and_store(**kw):
        receive, confirm = kw["receive"], kw["confirm_message_received"]

        def traced_receive():
            got = receive()
            if got is not None:
                timeline.record("supernode", event="received", message_id=got[0].metadata.message_id,
                                t=timeline.now())
            return got

        def traced_confirm(run_id, message_id):
            confirm(run_id, message_id)
            timeline.record("supernode", event="stored", message_id=message_id, t=timeline.now())

        return pull_and_store(**{**kw, "receive": traced_receive, "confirm_message_received": traced_confirm})

    def traced_push(**kw):
        send = kw["send"]

        def traced_send(message, object_tree, runtime):
            timeline.record("supernode", event="sending", message_id=message.metadata.reply_to_message_id,
                            t=timeline.now())
            return send(message, object_tree, runtime)

        return push(**{**kw, "send": traced_send})

    sci._pull_and_store_message, sci._push_messages = traced_pull_and_store, traced_push


def command(poll: float) -> list[str]:
    """The start of a SuperNode's command line (its flower-supernode arguments follow)."""
    return [sys.executable, "-m", "simulations.supernode", "--poll", f"{poll:g}"]


def main(argv: list[str] | None = None) -> None:
    # no -h of its own: --help is flower-supernode's (every argument but these two is Flower's)
    p = argparse.ArgumentParser(prog="python -m simulations.supernode", allow_abbrev=False, add_help=False)
    p.add_argument("--poll", type=float, default=0.1,
                   help=f"the SuperNode's sleep between polls after a message (Flower's: {FLOWER_IDLE_S:g} s), "
                        "and its longest wait for the ClientApp's reply (Flower's: 0.5 s)")
    p.add_argument("--poll-cap", type=float, default=POLL_CAP, help="the longest idle sleep")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not 0 < args.poll or not 0 < args.poll_cap:
        p.error("--poll and --poll-cap must be > 0")
    install(args.poll, args.poll_cap)
    if timeline.enabled():
        trace()
    from flwr.supernode.cli.flower_supernode import flower_supernode
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
