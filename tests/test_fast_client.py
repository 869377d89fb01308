"""The fast ClientApp path of a deployment, without starting one (docs/devices.md).

The parts: the per-process caches of a device's data (built once, built again when the config
or the data file changes), the long-lived ClientApp worker (Flower's task steps, in-process),
the SuperNode launcher's shorter sleeps, the ServerApp's reply polling, fedkd's retry backoff
for Flower's object pulls, the per-message timeline and the benchmark's arithmetic. The real
deployments of tests/test_deploy.py run on this path.
"""

import math
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable import inflatable_utils

from fedkd import edge, population, timeline
from fedkd.config import ExperimentConfig
from wire import Content, metric_dict, pack, unpack
from wire import waits

SMALL = {"synthetic-users": 30, "synthetic-items": 40, "synthetic-mean-length": 8, "users-per-client": 4}


@pytest.fixture(autouse=True)
def _flower_identity():
    """Messages are stamped with the run's identity, which a ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture
def loads(monkeypatch):
    """Empty caches, and a count of the times a population is built from its data."""
    population._cached.cache_clear()
    edge._cached.cache_clear()
    calls = []
    real = population.load_dataset

    def counting(cfg):
        calls.append(cfg.data_path or "synthetic")
        return real(cfg)
    monkeypatch.setattr(population, "load_dataset", counting)
    yield calls
    population._cached.cache_clear()
    edge._cached.cache_clear()


def _write_log(path, users: int) -> None:
    path.write_text("user,item,timestamp\n" + "".join(f"{u},{(u * 3 + t) % 7},{t}\n"
                                                      for u in range(users) for t in range(5)))


# ------------------------------------------------------------------------------- cached device state
def test_a_device_builds_its_data_once_per_config(loads):
    cfg = ExperimentConfig.from_flat(SMALL)
    first = edge.client_data(cfg, 0)
    assert edge.client_data(cfg, 0) is first and edge.client_data(ExperimentConfig.from_flat(SMALL), 0) is first
    assert edge.client_data(cfg, 1) is not first  # another partition: another entry, same population
    assert loads == ["synthetic"]
    # a setting the data does not depend on: the population is kept, the partition rebuilt from it
    other_lr = edge.client_data(ExperimentConfig.from_flat({**SMALL, "local-lr": 0.5}), 0)
    assert other_lr is not first and np.array_equal(other_lr.users, first.users) and loads == ["synthetic"]
    # a data setting: built again, and different
    reseeded = edge.client_data(ExperimentConfig.from_flat({**SMALL, "seed": 1}), 0)
    assert len(loads) == 2 and not np.array_equal(reseeded.train[0], first.train[0])


def test_a_changed_data_file_is_loaded_again(tmp_path, loads):
    data = tmp_path / "log.csv"
    _write_log(data, 10)
    cfg = ExperimentConfig.from_flat({"data-path": str(data), "cloud-fraction": 0.2, "users-per-client": 3})
    before = edge.client_data(cfg, 0)
    assert edge.client_data(cfg, 0) is before and len(loads) == 1
    assert population.population(cfg).dataset.num_users == 10
    _write_log(data, 20)  # the device's file replaced: same path, same config
    after = edge.client_data(cfg, 0)
    assert len(loads) == 2 and after is not before
    assert population.population(cfg).dataset.num_users == 20
    assert population.data_stamp(str(data)) != population.data_stamp(str(tmp_path / "gone.csv"))
    assert population.data_stamp("") == ()


def test_one_process_serving_two_runs_gives_each_its_own_data(tmp_path, loads):
    """What a long-lived ClientApp worker sees: the node setup of two runs with different settings."""
    from clients.node import setup
    data = tmp_path / "log.csv"
    _write_log(data, 12)

    def ctx(run_config):
        return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "data-path": str(data)},
                       state=RecordDict(), run_config=run_config)

    cfg_a, a = setup(ctx({"cloud-fraction": 0.25, "users-per-client": 3}))
    cfg_b, b = setup(ctx({"cloud-fraction": 0.25, "users-per-client": 5}))
    assert (len(a.users), len(b.users)) == (3, 5) and cfg_a != cfg_b
    assert setup(ctx({"cloud-fraction": 0.25, "users-per-client": 3}))[1] is a
    assert len(loads) == 2


def test_a_replaced_shard_is_read_again(tmp_path, loads):
    """A device that runs from its own shard (fedkd.shards) and is given a new one between runs."""
    from clients.node import setup
    from fedkd.shards import write_shards

    def shard_of(seed):
        cfg = ExperimentConfig.from_flat({**SMALL, "seed": seed})
        return write_shards(cfg, population.population(cfg), tmp_path / "shards", replace=True)[0]

    folder = shard_of(0)
    ctx = Context(run_id=1, node_id=1, node_config={"shard": str(folder)}, state=RecordDict(), run_config=SMALL)
    _, first = setup(ctx)
    assert setup(ctx)[1] is first
    assert shard_of(1) == folder  # the same folder, another partition's users
    _, second = setup(ctx)
    assert second is not first and not np.array_equal(second.users, first.users)


# ------------------------------------------------------------------------------- the ClientApp worker
class _Runtime:
    """Flower's task steps of one task as the worker calls them, recorded instead of sent."""

    def __init__(self, context: Context):
        self.context, self.pushed, self.outputs = context, [], []

    def pull_task_input(self, client):
        msg = Message(pack(Content(configs={"config": {"round": 1}})), dst_node_id=1, message_type="query")
        msg.metadata.__dict__["_message_id"] = "m1"
        return msg, self.context, SimpleNamespace(fab_id="fedkd", fab_version="0.1.0", run_id=1), \
            SimpleNamespace(hash_str="h1", content=b"")

    def push_message(self, client, message, context):
        self.pushed.append(message)

    def push_task_output(self, client, context, sub_status, details):
        self.outputs.append((context, sub_status, details))


class _Heartbeat:
    def __init__(self, fn):
        self.running = False

    def start(self):
        self.running = True

    def stop(self):
        self.running = False


@pytest.fixture
def worker(monkeypatch, tmp_path):
    from flwr.supernode.runtime import run_clientapp

    from simulations import clientapp_worker
    runtime = _Runtime(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    for name in ("pull_task_input", "push_message", "push_task_output"):
        monkeypatch.setattr(run_clientapp, name, getattr(runtime, name))
    monkeypatch.setattr("flwr.supercore.heartbeat.HeartbeatSender", _Heartbeat)
    launched = []
    monkeypatch.setenv("FEDKD_TASK_START", "0")  # the worker sets it per task; removed again after the test
    w = clientapp_worker.Worker("127.0.0.1:1", poll=0.0, launch=launched.append)
    w._client = lambda component, token=None: SimpleNamespace(close=lambda: None)
    calls = []
    app = ClientApp()

    @app.query()
    def hello(msg, context):
        calls.append(os.getpid())
        if unpack(msg.content).configs["config"].get("fail"):
            raise RuntimeError("boom")
        context.state["seen"] = ConfigRecord({"n": len(calls)})  # node state, handed back to the SuperNode
        return Message(pack(Content(metrics={"metrics": metric_dict({"n": len(calls)})})), reply_to=msg)

    w.app, w.fab_hash = app, "h1"  # as after the first task of FAB h1
    return SimpleNamespace(worker=w, runtime=runtime, calls=calls, launched=launched)


def test_the_worker_runs_tasks_in_its_own_process_and_keeps_the_app(worker):
    w, rt = worker.worker, worker.runtime
    w.run_task("token-1")
    w.run_task("token-2")
    assert worker.calls == [os.getpid(), os.getpid()]  # in this process, the same app object
    from fedkd import usage
    assert 0 <= usage.process_seconds() < 60  # a message's cost counts from its claim, not the worker's start
    assert [unpack(m.content).metrics["metrics"]["n"] for m in rt.pushed] == [1, 2]
    assert [(s, d) for _, s, d in rt.outputs] == [("completed", ""), ("completed", "")]
    assert rt.outputs[0][0] is rt.context and "seen" in rt.context.state  # the node state goes back
    assert w.handled == 2


def test_an_app_that_raises_gets_flowers_error_reply_and_the_worker_goes_on(worker, monkeypatch):
    from flwr.common.constant import ErrorCode
    w, rt = worker.worker, worker.runtime
    real = rt.pull_task_input

    def failing(client):
        msg, ctx, run, fab = real(client)
        msg.content.config_records["config"]["fail"] = True
        return msg, ctx, run, fab
    monkeypatch.setattr("flwr.supernode.runtime.run_clientapp.pull_task_input", failing)
    w.run_task("token-1")
    reply = rt.pushed[0]
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "<class 'RuntimeError'>:<'boom'>"  # what flwr-clientapp sends
    assert rt.outputs[0][1:] == ("failed", "<class 'RuntimeError'>:<'boom'>")
    monkeypatch.setattr("flwr.supernode.runtime.run_clientapp.pull_task_input", real)
    w.run_task("token-2")
    assert not rt.pushed[1].has_error()


def test_a_task_of_another_app_goes_to_a_fresh_flwr_clientapp(worker, monkeypatch):
    w = worker.worker
    tasks = [("t1", SimpleNamespace(fab_hash="h1")), None, ("t2", SimpleNamespace(fab_hash="h2"))]
    monkeypatch.setattr(w, "acquire", lambda: tasks.pop(0))
    w.serve(max_tasks=2)
    assert w.handled == 1 and w.handed_off == 1 and not tasks
    assert w.warm  # after its first task (torch is imported here): the optimiser machinery is loaded
    (cmd,) = worker.launched
    assert cmd[0].endswith("flwr-clientapp") and cmd[cmd.index("--token") + 1] == "t2"
    assert "--insecure" in cmd and cmd[cmd.index("--parent-pid") + 1] == str(os.getpid())
    assert cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:1"
    w.in_process = False  # another flwr version: every task goes to flwr-clientapp, as flower-superexec does
    tasks.append(("t3", SimpleNamespace(fab_hash="h1")))
    w.serve(max_tasks=1)
    assert w.handled == 1 and w.handed_off == 2


def test_worker_command_and_its_warm_up_leave_the_random_state_alone():
    import torch

    from simulations import clientapp_worker
    cmd = clientapp_worker.command("127.0.0.1:9101", parent_pid=42)
    assert cmd[1:3] == ["-m", "simulations.clientapp_worker"]
    assert cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9101" and cmd[-2:] == ["--parent-pid", "42"]
    state = torch.get_rng_state()
    clientapp_worker._first_step()
    assert torch.equal(torch.get_rng_state(), state)


def test_the_worker_imports_nothing_of_the_app_it_runs():
    """It loads the app from the run's FAB; a module of the app imported before would shadow the FAB's."""
    import ast
    from pathlib import Path
    tree = ast.parse((Path(__file__).resolve().parents[1] / "simulations" / "clientapp_worker.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] in {"fedkd", "clients", "server", "wire", "simulations"}]


# ------------------------------------------------------------------------------- Flower's waits
@pytest.fixture
def flower_defaults(monkeypatch):
    """Restore the Flower internals these tests change."""
    from flwr.supernode import start_client_internal as sci
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))
    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)
    monkeypatch.setattr(sci, "_push_messages", sci._push_messages)
    return sci


def test_object_pull_retries_start_sooner_in_every_process_the_same_way(flower_defaults):
    from simulations import clientapp_worker
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == waits.FLOWER_INITIAL_BACKOFF
    assert waits.shorten_object_pulls()
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        d = fn.__kwdefaults__
        assert (d["initial_backoff"], d["backoff_cap"]) == (waits.INITIAL_BACKOFF, waits.BACKOFF_CAP)
        assert d["max_tries_per_object"] * d["backoff_cap"] == 500 * 10  # as patient as Flower
    after_wire = dict(inflatable_utils.pull_objects.__kwdefaults__)
    assert clientapp_worker.shorten_object_pulls()  # the worker's own copy does the same
    assert inflatable_utils.pull_objects.__kwdefaults__ == after_wire
    assert clientapp_worker.FLWR_VERSION == waits.FLWR_VERSION
    from fedkd import usage
    assert clientapp_worker.TASK_START_ENV == usage.TASK_START_ENV


def test_the_supernode_launcher_polls_soon_after_a_message_and_less_while_idle(flower_defaults, monkeypatch):
    from simulations import supernode
    sci = flower_defaults
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert supernode.install(3.0) is None and sci.time is time  # Flower's own waits
    came = iter([None, 7, None])
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **kw: next(came))
    clock = supernode.install(0.1, cap=1.0)
    assert sci.time is clock and sci.time.time is time.time
    for _ in range(6):
        sci.time.sleep(3)  # the SuperLink had nothing: Flower would sleep 3 s each time
    sci.time.sleep(0.5)  # a check for the ClientApp's reply
    assert slept == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 0.1]
    assert sci._pull_and_store_message() is None and clock.idle == 1.0
    assert sci._pull_and_store_message() == 7 and clock.idle == 0.1  # a message came: poll soon again
    assert sci._pull_and_store_message() is None and clock.idle == 0.1
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == waits.INITIAL_BACKOFF
    assert supernode.command(0.1)[-4:] == ["-m", "simulations.supernode", "--poll", "0.1"]


def test_the_worker_claims_soon_after_a_task_and_less_while_idle(worker, monkeypatch):
    from simulations import clientapp_worker
    w = worker.worker
    w.poll, w.poll_cap = 0.05, 0.5
    slept = []
    monkeypatch.setattr(clientapp_worker.time, "sleep", slept.append)
    task = ("t", SimpleNamespace(fab_hash="h1"))
    tasks = [None] * 5 + [task] + [None] * 2 + [task]
    monkeypatch.setattr(w, "acquire", lambda: tasks.pop(0))
    w.serve(max_tasks=2)
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.5, 0.05, 0.1] and w.handled == 2


def test_the_supernode_launcher_records_when_a_message_was_taken_stored_and_answered(flower_defaults,
                                                                                     monkeypatch, tmp_path):
    from simulations import supernode
    sci = flower_defaults
    monkeypatch.setenv(timeline.ENV, str(tmp_path))
    msg = SimpleNamespace(metadata=SimpleNamespace(message_id="m1", reply_to_message_id="m1"))
    monkeypatch.setattr(sci, "_pull_and_store_message",
                        lambda **kw: (kw["receive"](), kw["confirm_message_received"](7, "m1"), 7)[-1])
    monkeypatch.setattr(sci, "_push_messages", lambda **kw: kw["send"](msg, None, 0.0))
    supernode.trace()
    assert sci._pull_and_store_message(receive=lambda: (msg, None), confirm_message_received=lambda r, m: None) == 7
    sci._push_messages(send=lambda m, tree, runtime: ({"x"}, "s"))
    events = timeline.read(tmp_path)
    assert [e["event"] for e in events] == ["received", "stored", "sending"]
    assert {e["message_id"] for e in events} == {"m1"} and {e["role"] for e in events} == {"supernode"}


# ------------------------------------------------------------------------------- the ServerApp's polling
class _Grid:
    """Replies become available after a number of pulls each."""

    def __init__(self, after: dict[str, int]):
        self.after, self.pulls = after, 0

    def push_messages(self, messages):
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i in ids if self.after[i] <= self.pulls]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ready)]


def _msgs(*ids):
    return [SimpleNamespace(metadata=SimpleNamespace(message_id=i)) for i in ids]


def test_the_server_pulls_until_every_reply_is_in_at_its_own_interval(monkeypatch, tmp_path):
    from server.transport import poll_replies
    slept = []
    monkeypatch.setattr("server.transport.time.sleep", slept.append)
    monkeypatch.setenv(timeline.ENV, str(tmp_path))
    grid = _Grid({"a": 1, "b": 3})
    got = poll_replies(grid, _msgs("a", "b"), timeout=None, poll=0.1, label=("train", 2))
    assert [r.metadata.reply_to_message_id for r in got] == ["a", "b"] and slept == [0.1, 0.1]
    records = timeline.read(tmp_path)
    assert {(r["message_id"], r["kind"], r["round"]) for r in records} == {("a", "train", 2), ("b", "train", 2)}


def test_the_server_stops_waiting_at_the_timeout_with_what_it_has(monkeypatch):
    from server.transport import poll_replies
    clock = [1000.0]
    monkeypatch.setattr("server.transport.time.time", lambda: clock[0])
    monkeypatch.setattr("server.transport.time.sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    grid = _Grid({"a": 1, "b": 10**6})
    got = poll_replies(grid, _msgs("a", "b"), timeout=1.0, poll=0.25, label=("train", 1))
    assert [r.metadata.reply_to_message_id for r in got] == ["a"] and grid.pulls == 4


def test_only_flowers_http_grid_is_polled_by_fedkd(monkeypatch):
    """The Deployment Engine's Grid waits 3 s between pulls; any other Grid keeps its own loop."""
    from flwr.superlink.grid.http_grid import HttpGrid

    from server import transport
    called = []
    monkeypatch.setattr(transport, "poll_replies", lambda grid, msgs, **kw: called.append(kw["poll"]) or [])
    other = SimpleNamespace(send_and_receive=lambda msgs, timeout=None: called.append(("own", timeout)) or [])
    transport.send_and_receive(other, _msgs("a"), timeout=5.0, poll=0.1)
    transport.send_and_receive(object.__new__(HttpGrid), _msgs("a"), timeout=5.0, poll=0.1)
    assert called == [("own", 5.0), 0.1]


def test_reply_poll_interval_is_a_checked_setting():
    assert ExperimentConfig().reply_poll_interval == 0.1
    for bad in (0.0, -1.0, math.nan, 61.0):
        with pytest.raises(ValueError, match="reply-poll-interval"):
            ExperimentConfig.from_flat({"reply-poll-interval": bad})


# ------------------------------------------------------------------------------- timeline and profile mod
def test_profile_mod_records_a_message_only_when_asked(monkeypatch, tmp_path):
    from clients.profile import profile_mod
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 2}, state=RecordDict(), run_config=SMALL)
    msg = Message(pack(Content()), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m9"

    def handler(m, c):
        return Message(pack(Content(metrics={"metrics": metric_dict({"train-seconds": 0.25})})), reply_to=m)
    monkeypatch.delenv(timeline.ENV, raising=False)
    profile_mod(msg, ctx, handler)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(timeline.ENV, str(tmp_path))
    reply = profile_mod(msg, ctx, handler)
    assert unpack(reply.content).metrics["metrics"]["train-seconds"] == 0.25
    (rec,) = timeline.read(tmp_path)
    assert rec["message_id"] == "m9" and rec["partition_id"] == 2 and rec["train_seconds"] == 0.25
    assert rec["entered"] <= rec["data_ready"] <= rec["done"]
    assert abs(rec["process_start"] - timeline.process_start()) < 0.05 and rec["process_start"] < time.time()


def test_deploy_bench_splits_a_message_into_phases_that_add_up():
    from simulations.deploy_bench import exchanges, message_phases, summarise
    server = {"role": "server", "kind": "train", "round": 1, "push_started": 100.0, "pushed": 100.5}
    events = [
        # a process per message, started before its SuperNode had the whole message
        {**server, "message_id": "a", "pulled": 110.0},
        {"role": "supernode", "event": "received", "message_id": "a", "t": 101.0},
        {"role": "supernode", "event": "stored", "message_id": "a", "t": 103.0},
        {"role": "supernode", "event": "sending", "message_id": "a", "t": 108.0},
        {"role": "client", "message_id": "a", "partition_id": 0, "process_start": 102.0, "entered": 106.0,
         "data_ready": 106.5, "done": 107.5, "train_seconds": 0.75},
        # the worker, and a SuperNode without records
        {**server, "message_id": "b", "pulled": 104.0},
        {"role": "worker", "message_id": "b", "claimed": 101.0, "input_pulled": 101.1, "app_ready": 101.2},
        {"role": "client", "message_id": "b", "partition_id": 1, "process_start": 50.0, "entered": 101.5,
         "data_ready": 101.5, "done": 102.0, "train_seconds": 0.5},
    ]
    a, b = message_phases(events)
    assert (a["to_node"], a["content"], a["claim"], a["startup"]) == (1.0, 2.0, 0.0, 3.0)
    assert (a["data"], a["training"], a["handler"], a["to_supernode"], a["to_server"]) == (0.5, 0.75, 0.25, 0.5, 2.0)
    parts = ("to_node", "content", "claim", "startup", "data", "training", "handler", "to_supernode", "to_server")
    assert sum(a[k] for k in parts) == a["total"] == 10.0
    assert math.isnan(b["to_node"]) and b["claim"] == 1.0 and b["startup"] == 0.5 and b["to_server"] == 2.0
    assert sum(b[k] for k in parts if not math.isnan(b[k])) == b["total"] == 4.0
    assert exchanges([a, b]) == [{"round": 1, "seconds": 10.0}]
    timing = [{"exchange_s": "12", "validate_s": "3", "round_s": "16"}, {"exchange_s": "4", "validate_s": "1",
                                                                          "round_s": "6"}]
    s = summarise([a, b], timing)
    assert s["phases"]["training"] == 0.625 and s["exchange_s"] == 8.0
    assert (s["exchange_s_round1"], s["exchange_s_later"]) == (12.0, 4.0)


def test_a_local_fleet_starts_each_supernode_with_its_worker_or_flowers_way(tmp_path, monkeypatch):
    from simulations import deploy
    started = []

    def start(fleet):
        def fake(name, cmd, *, home, cwd=None, pipe=False):
            started.append((name, cmd, home))
            return SimpleNamespace(pid=4242)
        return fake

    fast = deploy.LocalFleet(tmp_path / "a", out=lambda s: None)
    monkeypatch.setattr(fast, "start", start(fast))
    fast.start_supernode(1, 3)
    (node, ncmd, nhome), (worker, wcmd, whome) = started
    assert (node, worker) == ("supernode-1", "supernode-1-clientapp") and nhome == whome
    assert ncmd[1:5] == ["-m", "simulations.supernode", "--poll", "0.1"]
    assert ncmd[ncmd.index("--isolation") + 1] == "process"
    port = ncmd[ncmd.index("--port") + 1]
    assert wcmd[wcmd.index("--runtime-api-address") + 1] == f"127.0.0.1:{port}"
    assert wcmd[wcmd.index("--parent-pid") + 1] == "4242" and fast.workers == {"supernode-1": "supernode-1-clientapp"}

    started.clear()
    flower = deploy.LocalFleet(tmp_path / "b", out=lambda s: None, clientapp="flower", supernode_poll=0)
    monkeypatch.setattr(flower, "start", start(flower))
    flower.start_supernode(0, 3)
    ((name, cmd, _),) = started
    assert name == "supernode-0" and cmd[0].endswith("flower-supernode") and "--isolation" not in cmd
    for bad in ({"clientapp": "ray"}, {"supernode_poll": -1.0}):
        with pytest.raises(ValueError, match="--clientapp|--supernode-poll"):
            deploy.LocalFleet(tmp_path / "c", out=lambda s: None, **bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec's, inside Flower's build
def test_the_staged_app_gives_the_same_fab_without_walking_ignored_folders(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from simulations import deploy
    app = tmp_path / "app"
    files = {"pyproject.toml": (deploy.APP_DIR / "pyproject.toml").read_text(),
             ".gitignore": ".venv/\noutputs/\n*.pyc\n",
             "clients/client_app.py": "app = None\n", "server/server_app.py": "app = None\n", "README.md": "# x\n",
             "docs/img/plot.png": "png", "tests/test_x.py": "", ".venv/lib/site.py": "x = 1\n",
             "outputs/run/summary.json": "{}", "clients/__pycache__/x.pyc": "", ".git/info.json": "{}"}
    for rel, text in files.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    staged = deploy.stage_app(app, tmp_path / "staged")
    copied = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert copied == [".gitignore", "README.md", "clients/client_app.py", "pyproject.toml", "server/server_app.py",
                      "tests/test_x.py"]
    (app / ".git/info.json").unlink()  # Flower would ship a .git file it matches; nothing of .git is app code
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
