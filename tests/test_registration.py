"""handshake = "registration-order" (server/registration.py): the partition of each node, read
from the order Flower's simulation engine registered the nodes, checked on a sample of them.

The registration below is Flower's own (``vce_api._register_nodes`` into an in-memory
LinkState, as the simulation engine does it); the mapping it returns is the truth the plan
must reproduce."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from server.registration import disagreements, plan


def _registered(n: int):
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(n, factory)
    state = factory.state()
    ids = list(mapping)[::-1]  # the order the server lists them in must not matter
    return mapping, state.get_node_info(node_ids=ids), ids


def test_the_plan_places_every_node_where_flowers_engine_put_it():
    mapping, infos, ids = _registered(300)
    p = plan(infos, ids, num_partitions=300, verify=20, seed=3)
    assert not p.why
    assert {n: mapping[n] for n in p.derived} == p.derived  # every derived partition is the engine's
    ambiguous = set(ids) - set(p.derived)
    assert len(ambiguous) < 30 and ambiguous <= set(p.ask)  # nodes registered in the same microsecond are asked
    assert 20 - len(ambiguous) <= len(set(p.ask) - ambiguous) <= 20  # the sample: 20 ranks, the derived among them
    assert plan(infos, ids, num_partitions=300, verify=20, seed=3).ask == p.ask  # the sample is seeded
    assert plan(infos, ids, num_partitions=300, verify=20, seed=4).ask != p.ask


def _infos(times: dict[int, str]):
    return [SimpleNamespace(node_id=n, registered_at=t) for n, t in times.items()]


def test_nodes_registered_at_the_same_time_are_asked_and_the_others_keep_their_rank():
    times = {11: "2026-01-01T00:00:00.000001", 12: "2026-01-01T00:00:00.000003", 13: "2026-01-01T00:00:00.000003",
             14: "2026-01-01T00:00:00.000002", 15: "2026-01-01T00:00:00.000004",
             16: "2026-01-01T00:00:00"}  # isoformat() without the zero microsecond: the earliest of all
    p = plan(_infos(times), list(times), num_partitions=6, verify=0, seed=0)
    assert p.derived == {16: 0, 11: 1, 14: 2, 15: 5} and p.ask == [12, 13]


@pytest.mark.parametrize("connected,partitions", [(4, 5), (5, 4)])
def test_a_fleet_of_another_size_than_the_partitions_is_asked_whole(connected, partitions):
    times = {n: f"2026-01-01T00:00:00.00000{n}" for n in range(connected)}
    p = plan(_infos(times), list(times), num_partitions=partitions, verify=1, seed=0)
    assert p.derived == {} and sorted(p.ask) == list(times) and "nodes connected" in p.why


def test_a_missing_registration_time_means_asking_everyone():
    p = plan(_infos({1: "", 2: "2026-01-01T00:00:00"}), [1, 2], num_partitions=2, verify=0, seed=0)
    assert p.derived == {} and p.ask == [1, 2] and "registration time" in p.why
    p = plan(_infos({1: "yesterday", 2: "2026-01-01T00:00:00"}), [1, 2], num_partitions=2, verify=0, seed=0)
    assert p.derived == {} and p.ask == [1, 2] and "registration time" in p.why


def test_an_answer_other_than_the_implied_partition_is_a_disagreement():
    derived = {1: 0, 2: 1, 3: 2}
    assert disagreements(derived, {1: 0, 3: 2, 9: 7}) == []  # node 9 was not derived (asked for another reason)
    assert disagreements(derived, {1: 1, 2: 1}) == [(1, 0, 1)]
