"""The device's own meter: one line of time and peak memory per message (fedkd.usage), written to
the file its node config names as ``usage-log``; without one it does nothing.

Installed on the whole ClientApp (``ClientApp(mods=[usage_mod])``), so it is outermost around
every handler and the train mods alike and changes no message.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedkd import usage


def usage_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    path = context.node_config.get("usage-log")
    if not path:
        return call_next(msg, context)
    rec = msg.content.config_records.get("config")
    round_idx = int(rec["round"]) if rec is not None and "round" in rec else None
    t0, error = time.perf_counter(), True
    try:
        reply = call_next(msg, context)
        error = reply.has_error()
        return reply
    finally:
        usage.append(str(path), usage.record(msg.metadata.message_type, round_idx, time.perf_counter() - t0,
                                             error=error))
