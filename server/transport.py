"""Everything that crosses the wire, measured and logged: one place sends messages and receives replies.

Every message in either direction gets a line in ``wire.jsonl`` (and, with ``wire-payloads``,
its values in ``wire/``); training messages add their bytes, by content, to the traffic
meter behind metrics.csv's ``bytes_*`` columns; a node that sends no usable reply (Flower's
error reply, or none before ``round-timeout``) is logged in ``rejections.jsonl`` with its
reason, as is a node refused at the handshake (its data's fingerprint is not the fleet's,
fedkd.shards). Replies come back sorted by partition id, because arrival order must not
change a result.

Waiting for replies is :func:`send_and_receive`: on the Deployment Engine, Flower's
``Grid.send_and_receive`` loop (push, then pull until every reply is in or the timeout passes)
with the pause between pulls set by ``reply-poll-interval`` instead of Flower's fixed 3 s,
which alone added 1.5 s on average to every exchange (docs/devices.md). With
``exchange-window`` W, an exchange of more than W messages keeps only W in flight and sends
the next as replies come in (:func:`windowed`): Flower's state checks every message in flight
at every pull, so a 100,000-node handshake or test sent at once would cost time quadratic in
the fleet (docs/performance.md, "100,000 clients").

What an exchange sends is packed once per distinct content and shared by the messages that
carry it, and so are its byte counts: a 100,000-client test sends one student to everyone and
measures it once (:meth:`Transport.audit` with ``parts``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedkd import timeline
from fedkd.codec import PayloadError
from fedkd.shards import Claim, Fingerprint, Refusal
from fedkd.results import JsonLines
from fedkd.traffic import TrafficMeter, part_of
from server import registration
from wire import Content, describe_message, message_nbytes_by_part, message_payload, pack, unpack

log = logging.getLogger("fedkd")
# Messages whose bytes are the round's training traffic (metrics.csv bytes_*): the train
# message and, with secure aggregation, its share and unmask steps; evaluation is counted apart.
TRAINING_KINDS = ("train", "query.secagg_keys", "query.secagg_unmask")


@dataclass(frozen=True)
class Node:
    node_id: int
    partition_id: int
    tier: int
    examples: int
    enc_key: bytes = b""  # secure aggregation: the device's long-term public key for the shares it receives


@dataclass
class Exchanged:
    """One exchange's outcome: the usable replies (partition order), bytes, per-partition
    (down, up) bytes, and the reason code of every node that sent nothing usable."""

    replies: list[tuple[Node, Message]]
    down: int
    up: int
    sizes: dict[int, tuple[int, int]]
    failed: dict[int, str] = field(default_factory=dict)


class Profile:
    """Wall seconds per section of the current round (timing.csv; docs/performance.md)."""

    SECTIONS = ("targets_s", "prepare_s", "exchange_s", "audit_s", "accept_s", "aggregate_s", "validate_s",
                "client_train_s")

    def __init__(self) -> None:
        self.spent: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def timed(self, section: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent[section] += time.perf_counter() - t0

    def close_round(self) -> dict[str, float]:
        row = {k: round(self.spent[k], 6) for k in self.SECTIONS}
        self.spent.clear()
        return row


class Transport:
    """Sends contents to nodes over a Grid; measures, logs and checks what comes back."""

    def __init__(self, out: Path, *, round_timeout: float, wire_payloads: bool, profile: Profile,
                 handshake_timeout: float = 0.0, poll: float = 0.1, window: int = 0, handshake_verify: int = 100,
                 seed: int = 0) -> None:
        self.out, self.round_timeout, self.wire_payloads, self.profile = out, round_timeout, wire_payloads, profile
        self.handshake_timeout = handshake_timeout
        self.handshake_verify, self.seed = handshake_verify, seed  # handshake = "registration-order": its check
        self.poll = poll  # seconds between pulls while waiting for replies (reply-poll-interval)
        self.window = window  # messages in flight per exchange (exchange-window; 0: all at once)
        self.wire_log = JsonLines(out / "wire.jsonl")
        self.rejections = JsonLines(out / "rejections.jsonl")
        (out / "rejections.jsonl").touch()  # present (and empty) when nothing was rejected
        self.traffic = TrafficMeter()  # training bytes by content (docs/communication.md)
        self.seq = 0
        self.refused: list[Refusal] = []  # nodes refused at the handshake

    def handshake(self, grid: Grid, *, admit: Callable[[list[Claim]], tuple[list[Claim], list[Refusal]]] | None = None,
                  expected: int = 0, describe: Callable[[int], tuple[int, int, Fingerprint]] | None = None
                  ) -> list[Node]:
        """Ask every connected node who it is (partition, tier, examples, the fingerprint of its
        data) and keep the nodes ``admit`` accepts (``fedkd.shards.admit`` with the fingerprints the
        server expects). A node refused, whose handshake failed, or that did not answer within
        ``handshake-timeout`` (when set; otherwise the handshake waits for every node) gets a line in
        ``rejections.jsonl`` (round 0, type ``query``) and takes no part in the run. The nodes
        asked are those connected once ``expected`` are, or once no more arrive
        (:func:`wait_for_nodes`).

        With ``describe`` (``handshake = "registration-order"``: a partition's tier, examples and
        fingerprint as the server derives them), the nodes whose partition the engine's
        registration order implies are not asked but described so, once a sample of them has
        answered as implied (server.registration); they pass through ``admit`` like the others."""
        ids = wait_for_nodes(grid, expected)
        if describe is not None and _HttpGrid is not None and isinstance(grid, _HttpGrid):
            log.info("handshake registration-order is for the simulation engine; on the Deployment Engine "
                     "devices register in any order, so every node is asked")
            describe = None
        if describe is None:
            nodes, claims = self._ask(grid, ids)
        else:
            nodes, claims, placed = registration.ask_or_place(
                lambda some: self._ask(grid, some), grid.get_nodes(), ids, num_partitions=expected,
                verify=self.handshake_verify, seed=self.seed)
            for nid, pid in placed.items():
                tier, examples, fp = describe(pid)
                nodes[nid] = Node(nid, pid, tier, examples)
                claims.append(Claim(nid, pid, fp))
        if admit is not None:
            admitted, refused = admit(claims)
            for refusal in refused:
                self.refuse(refusal)
            nodes = {c.node_id: nodes[c.node_id] for c in admitted}
        return sorted(nodes.values(), key=lambda n: n.partition_id)

    def _ask(self, grid: Grid, node_ids: list[int]) -> tuple[dict[int, Node], list[Claim]]:
        """The handshake question to ``node_ids``: the nodes that answered, and their claims."""
        question = pack(Content())  # one (empty) content for every node, measured once
        msgs = [Message(question, dst_node_id=n, message_type="query") for n in node_ids]
        parts = None
        for m in msgs:
            parts = self.audit("down", m, 0, None, parts=parts)
        nodes, claims, answered = {}, [], set()
        for rep in send_and_receive(grid, msgs, timeout=self.handshake_timeout or None, poll=self.poll,
                                    label=("query", 0), window=self.window) if msgs else []:
            self.audit("up", rep, 0, None)
            answered.add(rep.metadata.src_node_id)
            if rep.has_error():
                self.refuse(Refusal(rep.metadata.src_node_id, None, "crashed",
                                    f"error code {rep.error.code}: {rep.error.reason[-300:]}"))
                continue
            got = unpack(rep.content)
            m = got.metrics["metrics"]
            enc_key = got.configs.get("secagg", {}).get("enc-key", b"")
            node = Node(rep.metadata.src_node_id, int(m["partition-id"]), int(m["tier"]), int(m["num-examples"]),
                        enc_key if isinstance(enc_key, bytes) else b"")
            nodes[node.node_id] = node
            claims.append(Claim(node.node_id, node.partition_id, _fingerprint(got)))
        for m in msgs:  # a device that cannot even answer (e.g. out of memory before its reply) holds no one up
            if m.metadata.dst_node_id not in answered:
                self.refuse(Refusal(m.metadata.dst_node_id, None, "timeout",
                                    f"no handshake reply within handshake-timeout ({self.handshake_timeout:g} s)"))
        return nodes, claims

    def refuse(self, refusal: Refusal) -> None:
        """Log a node refused at the handshake (fedkd.shards.HANDSHAKE_REASONS) and remember it."""
        self.refused.append(refusal)
        self.rejections.append({"round": 0, "partition_id": refusal.partition_id, "node_id": refusal.node_id,
                                "type": "query", "reason": refusal.reason, "detail": refusal.detail})
        log.warning("node %s (partition %s) refused at the handshake (%s): %s", refusal.node_id,
                    "?" if refusal.partition_id is None else refusal.partition_id, refusal.reason, refusal.detail)

    def exchange(self, grid: Grid, items: list[tuple[Node, Content]], kind: str, r: int) -> Exchanged:
        """Send each node its content; collect the replies. Training exchanges are timed as
        ``exchange_s``; validation and test ones belong to their caller's section (``validate_s``)."""
        if kind not in TRAINING_KINDS:
            return self._exchange(grid, items, kind, r)
        with self.profile.timed("exchange_s"):
            return self._exchange(grid, items, kind, r)

    def _exchange(self, grid: Grid, items: list[tuple[Node, Content]], kind: str, r: int) -> Exchanged:
        packed: dict[int, object] = {}  # one RecordDict per distinct content
        msgs, sizes = [], {}
        for n, c in items:
            if id(c) not in packed:
                packed[id(c)] = pack(c)
            msgs.append(Message(packed[id(c)], dst_node_id=n.node_id, message_type=kind))
        measured: dict[int, dict[str, int]] = {}  # a message's bytes depend on its content only: once per content
        for (n, _), m in zip(items, msgs):
            parts = self.audit("down", m, r, n.partition_id, parts=measured.get(id(m.content)))
            measured[id(m.content)] = parts
            if kind in TRAINING_KINDS:
                self.traffic.add("down", parts)
            sizes[n.partition_id] = (sum(parts.values()), 0)
        by_id = {n.node_id: n for n, _ in items}
        down = sum(d for d, _ in sizes.values())
        up, out, answered, errors = 0, [], set(), []
        for rep in send_and_receive(grid, msgs, timeout=self.round_timeout or None, poll=self.poll,
                                    label=(kind, r), window=self.window) if msgs else []:
            node = by_id.get(rep.metadata.src_node_id)
            if node is None:
                continue
            parts = self.audit("up", rep, r, node.partition_id)
            answered.add(node.partition_id)
            if rep.has_error():  # the ClientApp raised (or the engine lost it): Flower's error reply
                errors.append((node, PayloadError("crashed", f"error code {rep.error.code}: "
                                                             f"{rep.error.reason[-300:]}")))
                continue
            if kind in TRAINING_KINDS:
                self.traffic.add("up", parts)
            nbytes = sum(parts.values())
            up += nbytes
            sizes[node.partition_id] = (sizes[node.partition_id][0], nbytes)
            out.append((node, rep))
        errors += [(n, PayloadError("timeout", f"no {kind} reply within round-timeout ({self.round_timeout:g} s)"))
                   for n, _ in items if n.partition_id not in answered]
        failed = {n.partition_id: self.reject(r, n, kind, err)  # logged in partition order, not arrival
                  for n, err in sorted(errors, key=lambda e: e[0].partition_id)}
        out.sort(key=lambda p: p[0].partition_id)  # reply order must not change the result
        return Exchanged(out, down, up, sizes, failed)

    def nbytes(self, content: Content, *, count: bool = False) -> int:
        """Bytes of a train message with this content; ``count`` adds them to the round's traffic
        (a device dropped before it was sent anything still downloads its message)."""
        parts = message_nbytes_by_part(Message(pack(content), dst_node_id=0, message_type="train"), part_of)
        if count:
            self.traffic.add("down", parts)
        return sum(parts.values())

    def audit(self, direction: str, msg: Message, r: int, partition_id: int | None,
              parts: dict[str, int] | None = None) -> dict[str, int]:
        """One wire.jsonl line per message, in both directions (docs/privacy.md), and with
        ``wire-payloads`` every value it carries; returns its serialised size in bytes split by
        content (docs/communication.md), which sums to the message's size. ``parts``: that size
        as already measured on a message of the same content and type (the serialised size
        counts every random id at full width, so it depends on the content only,
        wire.message_nbytes), not measured again."""
        with self.profile.timed("audit_s"):
            if parts is None:
                parts = {} if msg.has_error() else message_nbytes_by_part(msg, part_of)
            self.seq += 1
            node = msg.metadata.dst_node_id if direction == "down" else msg.metadata.src_node_id
            line = {"seq": self.seq, "round": r, "direction": direction, "node_id": node,
                    "partition_id": partition_id, "bytes": sum(parts.values())}
            if msg.has_error():
                line.update(type=msg.metadata.message_type, error=msg.error.reason)
            else:
                line.update(describe_message(msg))
                if self.wire_payloads:
                    (self.out / "wire").mkdir(exist_ok=True)
                    np.savez(self.out / "wire" / f"{self.seq:07d}.npz", **message_payload(msg))
            self.wire_log.append(line)
            return parts

    def reject(self, r: int, node: Node, kind: str, err: PayloadError) -> str:
        """Log one refused or missing reply with its reason code; returns the code."""
        self.rejections.append({"round": r, "partition_id": node.partition_id, "node_id": node.node_id,
                                "type": kind, "reason": err.code, "detail": err.detail})
        log.warning("round %d: %s reply of client %d rejected (%s): %s", r, kind, node.partition_id, err.code,
                    err.detail[:200])
        return err.code

    def state_dict(self) -> dict:
        return {"traffic_total": self.traffic.total, "seq": self.seq}

    def load_state_dict(self, state: dict) -> None:
        self.traffic.total = state["traffic_total"]
        self.seq = state["seq"]


def _fingerprint(content: Content) -> Fingerprint | None:
    """The fingerprint a handshake reply carries; None if it carries none or a malformed one."""
    try:
        return Fingerprint.from_dict(content.configs["fingerprint"])
    except (KeyError, ValueError):
        return None


NODES_SETTLE_S = 5.0  # no new node for this long: the fleet is all there is


def wait_for_nodes(grid: Grid, expected: int, *, settle: float = NODES_SETTLE_S, poll: float = 0.2) -> list[int]:
    """The grid's node ids once ``expected`` nodes are connected, or once none has arrived for
    ``settle`` seconds (a deployment with fewer devices than partitions runs with those it has).

    Why: Flower's simulation engine registers its nodes in one thread while the ServerApp starts
    in another. With a cached teacher and 100,000 nodes (about a millisecond each) the ServerApp
    asked before registration ended and ran with the 15,231 nodes there were then, measured. A
    node that connects after this still takes no part, as before."""
    ids, last, changed = list(grid.get_node_ids()), -1, time.monotonic()
    said = time.monotonic()
    while len(ids) < expected:
        now = time.monotonic()
        if len(ids) != last:
            last, changed = len(ids), now
        elif now - changed >= settle:
            log.warning("%d of %d nodes connected and none for %.0f s: the run goes on with them",
                        len(ids), expected, settle)
            break
        if now - said >= 10:
            log.info("waiting for nodes: %d of %d connected", len(ids), expected)
            said = now
        time.sleep(poll)
        ids = list(grid.get_node_ids())
    return ids


def send_and_receive(grid: Grid, messages: list[Message], *, timeout: float | None, poll: float,
                     label: tuple[str, int] = ("", 0), window: int = 0) -> list[Message]:
    """The replies to ``messages`` (all, or those in by ``timeout`` seconds; None: no limit).

    With ``window`` (``exchange-window``) smaller than the number of messages, :func:`windowed`
    keeps at most ``window`` in flight. Otherwise, on Flower's ``HttpGrid`` (the Deployment
    Engine), which waits a fixed 3 s between pulls, :func:`poll_replies` runs the same loop with
    ``poll`` seconds between pulls. Any other Grid answers with its own ``send_and_receive``
    (the simulation's ``InMemoryGrid`` pulls every 0.1 s already). With ``FEDKD_PROFILE_DIR``
    set, records when the messages were pushed and each reply pulled (``label``: the message
    kind and round, for the record).
    """
    if 0 < window < len(messages):
        return windowed(grid, messages, timeout=timeout, poll=poll, window=window, label=label)
    if _HttpGrid is not None and isinstance(grid, _HttpGrid):
        return poll_replies(grid, messages, timeout=timeout, poll=poll, label=label)
    started = timeline.now()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    _record(replies, label, started, started, timeline.now())
    return replies


def poll_replies(grid: Grid, messages: list[Message], *, timeout: float | None, poll: float,
                 label: tuple[str, int] = ("", 0)) -> list[Message]:
    """Flower's ``Grid.send_and_receive`` loop, pulling every ``poll`` seconds: push every
    message, then pull the replies to them until all are in or ``timeout`` seconds have passed
    (None: no limit), exactly as Flower's loop does; only the pause between pulls differs. It
    is :func:`windowed` with a window that holds every message."""
    return windowed(grid, messages, timeout=timeout, poll=poll, window=max(1, len(messages)), label=label)


def windowed(grid: Grid, messages: list[Message], *, timeout: float | None, poll: float, window: int,
             label: tuple[str, int] = ("", 0)) -> list[Message]:
    """Flower's push-then-pull loop with at most ``window`` messages in flight: push the first
    ``window``, then after every pull push as many more as replies came in, until every reply
    is in or ``timeout`` seconds have passed since the first push (None: no limit); a message
    not yet pushed by then gets no reply, like one whose reply is late.

    Why: Flower's in-memory LinkState checks (expiry, node availability) every message it is
    asked about at every pull, under the lock the simulation's workers need to store their
    replies, and the engine's dispatcher scans the stored messages every 0.1 s; a pull costs
    the messages in flight. All 100,000 of a test at once make each pull and sweep cost a
    100,000-message scan, about ten times a second for the whole test. A window a few
    thousand deep still holds far more messages than the workers can answer between two
    pulls (fewer than a hundred on 2 cores), so it never leaves them idle.
    """
    started = timeline.now()
    end = time.time() + timeout if timeout is not None else None
    queue = iter(messages)
    in_flight: set[str] = set()

    def push() -> None:  # until the window is full or nothing is left (a message Flower refuses gets no id)
        while len(in_flight) < window and (batch := list(itertools.islice(queue, window - len(in_flight)))):
            in_flight.update(grid.push_messages(batch))

    push()
    pushed = timeline.now()
    replies: list[Message] = []
    while in_flight and (end is None or time.time() < end):  # Flower's loop: the deadline before each pull
        got = list(grid.pull_messages(set(in_flight)))
        _record(got, label, started, pushed, timeline.now())
        replies += got
        in_flight.difference_update(rep.metadata.reply_to_message_id for rep in got)
        push()
        if not in_flight:
            break
        time.sleep(poll)
    return replies


def _record(replies: list[Message], label: tuple[str, int], started: float, pushed: float, pulled: float) -> None:
    if replies and timeline.enabled():
        for rep in replies:
            timeline.record("server", event="reply", message_id=rep.metadata.reply_to_message_id, kind=label[0],
                            round=label[1], push_started=started, pushed=pushed, pulled=pulled)


try:  # flwr 1.41's Grid of a ServerApp on a SuperLink
    from flwr.superlink.grid.http_grid import HttpGrid as _HttpGrid
except ImportError:  # another flwr: its own send_and_receive everywhere
    _HttpGrid = None
