"""Central DP's clipping on the device, when secure aggregation hides the updates from the server.

Without secure aggregation the server clips each update it decodes (``server/aggregation.py``);
with it, the server sees only the masked sum and cannot clip what it cannot see, so each device
clips its own, the job of Flower's ``fixedclipping_mod`` beside its client-side-clipping
strategy wrappers. Unlike that mod this one clips the float update before it is masked, and
takes the norm from the run config rather than from each message.

Distributed DP (``dp-mode = distributed``) clips in the handler instead, in
``fedkd.ddp.encode``, after every mod's step: its unclipped bit (adaptive clipping) needs the
norm before clipping, and its rounding needs the clipped vector's grid.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.mods.update import update_step
from clients.node import setup
from fedkd.privacy import clip_update


def secagg_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg, _ = setup(context)
    if not (cfg.secure_aggregation and cfg.dp_mode == "central"):
        return call_next(msg, context)
    with update_step(lambda update: clip_update(update, cfg.dp_clip_norm)[0]):
        return call_next(msg, context)
