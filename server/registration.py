"""Which node holds which partition, read from the order the simulation engine registered them
(``handshake = "registration-order"``), and checked against a sample of the nodes' own answers.

Why: the handshake asks every node who it is, one message per node, and Flower's simulation
engine costs about 5 ms per message on 2 cores whatever the message carries: 9 of the 21
minutes of a 100,000-client run (docs/performance.md). In simulation the answer is known
before anyone is asked: Flower 1.41's engine registers ``num-supernodes`` nodes one after the
other and gives the i-th of them ``partition-id`` i (``vce_api._register_nodes``), and every
node derives its data from the run config the server holds. The order is visible through
Flower's public ``Grid.get_nodes()`` (each node's ``registered_at``); the partition it implies is
an engine behaviour, not an API, so it is not trusted blindly: a seeded sample of nodes, and
every node whose registration time another node shares, are asked as before, and one answer
that disagrees sends the handshake back to asking everyone. On the Deployment Engine, where
devices register in any order, that check fails at its first answers and costs only them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

log = logging.getLogger("fedkd")


@dataclass
class Plan:
    """``derived``: node id -> partition id implied by the registration order; ``ask``: the node
    ids the handshake asks anyway (the check sample and the ambiguous ones); ``why``: set when
    there is nothing to derive, with the reason (then every node is asked)."""

    derived: dict[int, int] = field(default_factory=dict)
    ask: list[int] = field(default_factory=list)
    why: str = ""


def plan(infos, node_ids: list[int], *, num_partitions: int, verify: int, seed: int) -> Plan:
    """The partitions ``infos`` (Flower ``NodeInfo``s of the connected ``node_ids``) imply.

    Node i in order of registration holds partition i, when exactly ``num_partitions`` nodes are
    connected; a node whose ``registered_at`` equals another's has no defined place among them
    and is asked, as are ``verify`` nodes drawn with ``seed``."""
    when = {int(i.node_id): i.registered_at for i in infos}
    if len(node_ids) != num_partitions or set(when) != set(node_ids):
        return Plan(ask=list(node_ids), why=f"{len(node_ids)} nodes connected for {num_partitions} partitions")
    try:  # parsed: isoformat() leaves out a zero microsecond, so the strings are not all one shape
        when = {n: datetime.fromisoformat(t) for n, t in when.items()}
    except (TypeError, ValueError):
        return Plan(ask=list(node_ids), why="the engine gives no registration time")
    order = sorted(node_ids, key=lambda n: when[n])
    ties = Counter(when.values())
    derived = {n: pid for pid, n in enumerate(order) if ties[when[n]] == 1}
    ambiguous = [n for n in order if ties[when[n]] > 1]
    sample = np.random.default_rng(seed).choice(len(order), size=min(verify, len(order)), replace=False)
    checked = [order[i] for i in sorted(sample) if order[i] in derived]
    return Plan(derived=derived, ask=checked + ambiguous)


def disagreements(derived: dict[int, int], answered: dict[int, int]) -> list[tuple[int, int, int]]:
    """(node id, derived partition, answered partition) for every asked node whose own answer is
    not what the registration order implied."""
    return [(n, derived[n], pid) for n, pid in sorted(answered.items()) if n in derived and derived[n] != pid]


def ask_or_place(ask, infos, node_ids: list[int], *, num_partitions: int, verify: int, seed: int):
    """The handshake by registration order: ``ask`` (the transport's question to some node ids:
    -> (nodes by id, claims)) goes to the :func:`plan`'s sample and ambiguous nodes, then to every
    other node if one answer disagrees. Returns (nodes, claims, placed): ``placed`` maps each node
    left unasked to the partition its registration order gives it."""
    p = plan(infos, node_ids, num_partitions=num_partitions, verify=verify, seed=seed)
    if p.why:
        log.info("handshake: asking every node (%s)", p.why)
    nodes, claims = ask(p.ask)
    if not p.derived:
        return nodes, claims, {}
    if wrong := disagreements(p.derived, {nid: n.partition_id for nid, n in nodes.items()}):
        n, implied, said = wrong[0]
        log.warning("handshake: %d of the %d nodes asked do not hold the partition their registration order "
                    "implies (node %s: %d, says %d); asking every node", len(wrong), len(p.ask), n, implied, said)
        asked = set(p.ask)
        more_nodes, more_claims = ask([n for n in node_ids if n not in asked])
        return {**nodes, **more_nodes}, claims + more_claims, {}
    asked = set(p.ask)
    placed = {nid: pid for nid, pid in p.derived.items() if nid not in asked}
    log.info("handshake: %d nodes asked answered as their registration order implies; the other %d are placed "
             "by it", len(p.ask), len(placed))
    return nodes, claims, placed
