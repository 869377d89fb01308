"""Where a message's time goes inside the ClientApp: a mod around every handler.

With ``FEDKD_PROFILE_DIR`` set (:mod:`fedkd.timeline`), :func:`profile_mod` writes one line
per message: when this process started, when the handler was entered, when the device's
config and data were ready (:func:`clients.node.setup`, cached per process, so the handler's
own call is then free), when the handler returned, and the training seconds the reply reports.
Without it the mod only calls the handler.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.node import setup
from fedkd import timeline


def profile_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if not timeline.enabled():
        return call_next(msg, context)
    entered = timeline.now()
    _, data = setup(context)
    ready = timeline.now()
    reply = call_next(msg, context)
    done = timeline.now()
    metrics = reply.content.metric_records.get("metrics") if reply.has_content() else None
    timeline.record("client", event="handled", message_id=msg.metadata.message_id,
                    type=msg.metadata.message_type, partition_id=data.partition_id,
                    process_start=timeline.process_start(), entered=entered, data_ready=ready, done=done,
                    train_seconds=float(metrics.get("train-seconds", 0.0)) if metrics else 0.0)
    return reply
