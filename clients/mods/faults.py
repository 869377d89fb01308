"""Injected faults as Flower mods: the fleet the server must survive, outside the code it tests.

``fault_mod`` wraps the whole ``train`` handler: a crash raises before any work (Flower turns it
into an error reply), a hang sleeps past the server's ``round-timeout`` and then works as
usual, and a corruption breaks the finished reply: one uploaded record (``corrupt``), the
reported step count, or the bytes below the numpy level (``garble``). ``malicious_mod`` is the
well-formed lie: the update, boosted, before it is encoded. Which fault a client suffers and
what each looks like is ``fedkd/faults.py``; this module only says where in a message's life
each one strikes.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.mods.update import update_step
from clients.node import round_of, setup
from fedkd.config import FAULT_KINDS
from fedkd.faults import HANG_MARGIN_S, corrupt, draw_fault, malicious_ids
from wire import from_record, garble, to_record


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg, data = setup(context)
    round_idx = round_of(msg)
    fault = draw_fault(cfg, round_idx, data.partition_id)  # docs/reliability.md
    if fault == "crash":
        raise RuntimeError(f"injected fault: client {data.partition_id} crashes in round {round_idx} (fault-crash)")
    if fault == "hang":  # the server stops waiting at round-timeout; this reply arrives too late
        time.sleep(cfg.round_timeout + HANG_MARGIN_S)
    reply = call_next(msg, context)
    if fault not in FAULT_KINDS or reply.has_error():
        return reply
    rd = reply.content
    uploaded = sorted(rd.array_records)[:1]  # the record a corruption hits: 'masked', 'preds' or 'update'
    if uploaded:
        rd[uploaded[0]] = to_record(corrupt(from_record(rd.array_records[uploaded[0]]), fault))
    if fault == "steps":  # a lie about work done: one step over the limit
        metrics = rd.metric_records["metrics"]
        metrics["steps"] = int(metrics["step-limit"]) + 1
    if fault == "undecodable" and uploaded:
        garble(rd, uploaded[0])
    return reply


def malicious_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg, data = setup(context)
    if data.partition_id not in malicious_ids(cfg):
        return call_next(msg, context)
    scale = cfg.fault_malicious_scale
    with update_step(lambda update: {k: (v * scale).astype(np.float32) for k, v in update.items()}):
        return call_next(msg, context)
