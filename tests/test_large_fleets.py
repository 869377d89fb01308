"""Large fleets (issue 19): exchanges with a bounded number of messages in flight, one byte
measurement per shared content, and the ClientApp's student decoded once per evaluation.

The grid below has Flower's InMemoryGrid's shape as the transport uses it (``push_messages``
gives ids, ``pull_messages`` returns the replies in so far) and answers with the real
ClientApp, in this process; it records how many messages it held at once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedkd.config import ExperimentConfig
from fedkd.population import population
from server.transport import Node, Profile, Transport, send_and_receive
from wire import Content, pack, unpack

FLAT = {"synthetic-users": 40, "synthetic-items": 60, "synthetic-mean-length": 8}


@pytest.fixture(autouse=True)
def _flower_identity():
    """Messages are stamped with the run's identity, which a ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class _Grid:
    """Nodes 100, 101, ... hold partitions 0, 1, ...; a node answers a message at the first pull
    after it was pushed, through the real ClientApp; ``silent`` nodes never answer, ``gone``
    nodes are refused at the push (no message id, as Flower's state does for an unknown node)."""

    def __init__(self, n: int, *, silent=(), gone=(), run_config=FLAT, registered=None):
        self.contexts = {100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p,
                                                                                  "num-partitions": n},
                                          state=RecordDict(), run_config=dict(run_config)) for p in range(n)}
        # Flower's NodeInfo.registered_at, by default in partition order as the simulation engine registers
        order = list(self.contexts) if registered is None else registered
        self.registered = {nid: f"2026-01-01T00:00:{i // 1000:02d}.{i % 1000:03d}000+00:00" for i, nid in enumerate(order)}
        self.silent, self.gone = set(silent), set(gone)
        self.stored: dict[str, Message] = {}
        self.peak, self.pushed, self.whole = 0, 0, []

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        from types import SimpleNamespace
        return [SimpleNamespace(node_id=n, registered_at=t) for n, t in self.registered.items()]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            if m.metadata.dst_node_id in self.gone:
                continue
            self.pushed += 1
            m.metadata.__dict__["_message_id"] = f"m{self.pushed}"
            self.stored[f"m{self.pushed}"] = m
            ids.append(f"m{self.pushed}")
        self.peak = max(self.peak, len(self.stored))
        return ids

    def pull_messages(self, ids):
        from clients.client_app import app
        out = []
        for i in ids:
            m = self.stored.get(i)
            if m is not None and m.metadata.dst_node_id not in self.silent:
                del self.stored[i]
                out.append(app(m, self.contexts[m.metadata.dst_node_id]))
        return out

    def send_and_receive(self, messages, timeout=None):  # Flower's own loop, when no window applies
        self.whole.append(len(messages))
        ids = self.push_messages(messages)
        return self.pull_messages(ids)


def _transport(tmp_path, round_timeout: float = 0.0, **kw) -> Transport:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Transport(tmp_path, round_timeout=round_timeout, wire_payloads=False, profile=Profile(), poll=0.001, **kw)


def _wire(path) -> list[dict]:
    return [json.loads(x) for x in (path / "wire.jsonl").read_text().splitlines()]


def test_a_windowed_handshake_finds_the_same_nodes_with_at_most_the_window_in_flight(tmp_path):
    n = population(ExperimentConfig.from_flat(FLAT)).num_clients
    assert n > 10
    whole, windowed = _Grid(n), _Grid(n)
    expected = _transport(tmp_path / "all").handshake(whole)
    got = _transport(tmp_path / "w", window=4).handshake(windowed)
    assert [(nd.node_id, nd.partition_id, nd.tier, nd.examples) for nd in got] == \
        [(nd.node_id, nd.partition_id, nd.tier, nd.examples) for nd in expected]
    assert [nd.partition_id for nd in got] == list(range(n))
    assert whole.whole == [n] and windowed.whole == []  # the window replaced Flower's loop
    assert windowed.peak == 4 and whole.peak == n
    # the same wire.jsonl lines (arrival order aside), each message's bytes as measured alone
    key = lambda ln: (ln["direction"], ln["node_id"])  # noqa: E731
    strip = lambda ln: {k: v for k, v in ln.items() if k != "seq"}  # noqa: E731
    assert sorted(map(strip, _wire(tmp_path / "w")), key=key) == sorted(map(strip, _wire(tmp_path / "all")), key=key)


def test_a_window_past_a_silent_node_and_a_refused_push_still_serves_everyone_else(tmp_path):
    """A node that never answers holds one place of the window until handshake-timeout, not the
    exchange; a message Flower refuses at the push does not stop the rest going out."""
    n = population(ExperimentConfig.from_flat(FLAT)).num_clients
    grid = _Grid(n, silent={100}, gone={101})
    transport = _transport(tmp_path, window=2, handshake_timeout=0.5)
    nodes = transport.handshake(grid)
    assert [nd.partition_id for nd in nodes] == list(range(2, n))
    lines = [json.loads(x) for x in (tmp_path / "rejections.jsonl").read_text().splitlines()]
    assert sorted((ln["node_id"], ln["reason"]) for ln in lines) == [(100, "timeout"), (101, "timeout")]


def test_a_windowed_exchange_stops_at_its_timeout_and_sends_nothing_more(tmp_path):
    n = population(ExperimentConfig.from_flat(FLAT)).num_clients
    grid = _Grid(n, silent={100, 101})
    msgs = [Message(pack(Content()), dst_node_id=nid, message_type="query") for nid in grid.get_node_ids()]
    replies = send_and_receive(grid, msgs, timeout=0.2, poll=0.01, window=2)
    assert replies == [] and grid.pushed == 2  # both places held by silent nodes until the deadline
    assert send_and_receive(_Grid(n), msgs[:3], timeout=None, poll=0.01, window=3) != []  # fits: Flower's loop


def test_an_exchange_measures_a_shared_content_once_and_logs_every_message(tmp_path, monkeypatch):
    import server.transport as transport_mod
    calls = []
    real = transport_mod.message_nbytes_by_part
    monkeypatch.setattr(transport_mod, "message_nbytes_by_part", lambda m, p: calls.append(m) or real(m, p))
    n = 6
    grid = _Grid(n)
    transport = _transport(tmp_path, window=4, round_timeout=0.1)
    nodes = [Node(100 + p, p, 0, 1) for p in range(n)]
    content = Content(configs={"config": {"splits": "valid", "round": 1}})
    other = Content(configs={"config": {"splits": "valid,test", "round": 1}})
    items = [(nd, content if nd.partition_id % 2 else other) for nd in nodes]
    monkeypatch.setattr(grid, "pull_messages", lambda ids: [])  # no replies: only the downlink is measured
    ex = transport.exchange(grid, items, "evaluate", 1)
    assert len([m for m in calls if m.metadata.message_type == "evaluate"]) == 2  # one per distinct content
    down = [ln for ln in _wire(tmp_path) if ln["direction"] == "down"]
    assert len(down) == n and ex.down == sum(ln["bytes"] for ln in down)
    for ln, (_, c) in zip(down, items):
        assert ln["bytes"] == sum(real(Message(pack(c), dst_node_id=7, message_type="evaluate"),
                                       transport_mod.part_of).values())
    assert ex.failed == {p: "timeout" for p in range(n)}  # nobody answered within round-timeout


def test_the_client_decodes_an_evaluations_student_once_and_scores_as_a_fresh_model():
    import clients.client_app as ca
    from fedkd.local import get_state
    from fedkd.metrics import evaluate_ranking
    from fedkd.models import build_model
    from server.protocols.base import contents_by_width
    from clients.node import setup

    cfg = ExperimentConfig.from_flat(FLAT)
    grid = _Grid(population(cfg).num_clients)
    full = cfg.student_model(population(cfg).dataset.num_items)
    ca._SCORERS.clear()

    def content(seed):
        return pack(contents_by_width(Content(configs={"config": {"splits": "test", "round": 1}}),
                                      get_state(build_model(full, seed=seed)), [cfg.student_dim],
                                      full_model=full, cfg=cfg)[cfg.student_dim])

    def scores(rd, nodes):
        out = []
        for nid in nodes:
            rep = ca.app(Message(rd, dst_node_id=nid, message_type="evaluate"), grid.contexts[nid])
            out.append(unpack(rep.content).metrics["metrics"]["test-ndcg-sum"])
        return out

    first, second = content(0), content(1)
    got = scores(first, [100, 101, 102])
    assert len(ca._SCORERS) == 1
    [model] = ca._SCORERS.values()
    assert scores(first, [103]) and list(ca._SCORERS.values()) == [model]  # kept, not rebuilt
    for nid, s in zip([100, 101, 102], got):  # the same score as a model decoded for this message alone
        _, data = setup(grid.contexts[nid])
        fresh, _ = ca._student(cfg, data, unpack(first))
        assert s == pytest.approx(float(evaluate_ranking(fresh, data.test, k=cfg.eval_k).per_user_ndcg.sum()))
    assert len(scores(second, [100])) == 1 and len(ca._SCORERS) == 2  # another student: decoded afresh
    second_model = ca._SCORERS[next(reversed(ca._SCORERS))]
    a, b = get_state(model), get_state(second_model)
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_a_devices_footprint_is_computed_once_per_width_not_once_per_device(monkeypatch):
    """The server asks every device's width at start-up (server.fleet.Fleet): 100,000 devices
    must not rebuild the same layout 100,000 times."""
    from fedkd import schedule
    from fedkd.schedule import fleet_profiles, width_for
    cfg = ExperimentConfig.from_flat({**FLAT, "student-widths": "8,16"})
    model = cfg.student_model(60)
    calls = []
    real = schedule.sub_layout
    monkeypatch.setattr(schedule, "sub_layout", lambda m, w: calls.append(w) or real(m, w))
    schedule.footprint_mb.cache_clear()
    widths = [width_for(p, model, cfg.widths) for p in fleet_profiles(cfg, 50)]
    assert len(widths) == 50 and sorted(calls) == sorted(cfg.widths)
    schedule.footprint_mb.cache_clear()


class _Registering:
    """A grid whose nodes register a few per call to ``get_node_ids``, up to ``total``, as
    Flower's simulation engine registers them in its own thread while the ServerApp starts."""

    def __init__(self, total: int, per_call: int):
        self.total, self.per_call, self.calls = total, per_call, 0

    def get_node_ids(self):
        self.calls += 1
        return list(range(min(self.total, self.calls * self.per_call)))


def test_the_handshake_waits_for_every_expected_node_to_register():
    from server.transport import wait_for_nodes
    grid = _Registering(total=50, per_call=10)
    assert wait_for_nodes(grid, 50, poll=0.001) == list(range(50))  # not the 10 there at first
    assert grid.calls == 5


def test_a_fleet_smaller_than_expected_goes_on_once_no_node_arrives(caplog):
    from server.transport import wait_for_nodes
    grid = _Registering(total=30, per_call=10)
    assert wait_for_nodes(grid, 50, settle=0.05, poll=0.001) == list(range(30))
    assert "30 of 50 nodes connected" in caplog.text


def _registration_handshake(tmp_path, grid: _Grid, flat: dict):
    import functools

    from fedkd import shards
    from server.compose import describer
    cfg = ExperimentConfig.from_flat(flat)
    pop = population(cfg)
    expected = functools.partial(shards.fingerprint, cfg, pop)
    transport = _transport(tmp_path, handshake_verify=cfg.handshake_verify, seed=cfg.seed)
    nodes = transport.handshake(grid, admit=functools.partial(shards.admit, num_partitions=pop.num_clients,
                                                              expected=expected),
                                expected=pop.num_clients, describe=describer(cfg, expected))
    asked = [ln["node_id"] for ln in _wire(tmp_path) if ln["direction"] == "down"]
    return [(nd.node_id, nd.partition_id, nd.tier, nd.examples) for nd in nodes], asked


REGISTRATION = {**FLAT, "handshake": "registration-order", "handshake-verify": 3}


def test_the_registration_order_handshake_asks_a_sample_and_places_the_rest_as_asking_all_would(tmp_path):
    """The nodes, tiers and example counts it derives are those every node would have answered."""
    n = population(ExperimentConfig.from_flat(REGISTRATION)).num_clients
    everyone, asked_all = _registration_handshake(tmp_path / "all", _Grid(n, run_config=REGISTRATION),
                                                  {**REGISTRATION, "handshake": "ask"})
    placed, asked = _registration_handshake(tmp_path / "reg", _Grid(n, run_config=REGISTRATION), REGISTRATION)
    assert len(asked_all) == n and len(asked) == 3
    assert placed == everyone and [p for _, p, _, _ in placed] == list(range(n))
    assert {t for _, _, t, _ in placed} == {0, 1}  # both tiers present: the derived tier is checked


def test_a_registration_order_that_does_not_match_the_answers_means_asking_every_node(tmp_path, caplog):
    n = population(ExperimentConfig.from_flat(REGISTRATION)).num_clients
    everyone, _ = _registration_handshake(tmp_path / "all", _Grid(n, run_config=REGISTRATION),
                                          {**REGISTRATION, "handshake": "ask"})
    shuffled = [100 + p for p in np.random.default_rng(0).permutation(n)]  # e.g. a deployment's devices
    with caplog.at_level("WARNING", logger="fedkd"):
        placed, asked = _registration_handshake(tmp_path / "reg", _Grid(n, run_config=REGISTRATION,
                                                                         registered=shuffled), REGISTRATION)
    assert placed == everyone and sorted(asked) == sorted(100 + p for p in range(n))
    assert "asking every node" in caplog.text


def test_on_the_deployment_engine_the_registration_order_handshake_asks_every_node(tmp_path, caplog):
    """Devices register with a SuperLink in any order: there, the setting asks everyone (even
    when, as here, the order happens to be right)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    class _DeploymentGrid(_Grid, HttpGrid):  # the in-process answers, with the Deployment Engine's grid type
        pass

    n = population(ExperimentConfig.from_flat(REGISTRATION)).num_clients
    everyone, _ = _registration_handshake(tmp_path / "all", _Grid(n, run_config=REGISTRATION),
                                          {**REGISTRATION, "handshake": "ask"})
    with caplog.at_level("INFO", logger="fedkd"):
        placed, asked = _registration_handshake(tmp_path / "dep", _DeploymentGrid(n, run_config=REGISTRATION),
                                                REGISTRATION)
    assert placed == everyone and len(asked) == n
    assert "Deployment Engine" in caplog.text
