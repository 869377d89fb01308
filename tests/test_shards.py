"""Device shards, the fleet fingerprint and the handshake that checks it (fedkd.shards), and the
device's own usage meter (fedkd.usage): fast, in one process.

The handshake tests run the real ClientApp's ``hello`` handler on Flower ``Message`` objects
and feed its replies to the server's own ``Transport.handshake`` with the admission the
ServerApp composes; tests/test_deploy.py does the same with real SuperNodes on loopback.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedkd import shards, usage
from fedkd.config import ExperimentConfig
from fedkd.edge import client_data, shard_client_data
from fedkd.population import population
from fedkd.shards import Claim, Fingerprint
from wire import Content, pack

# 50 synthetic users, 20% in the cloud: 40 edge users in 3 clients of 14, 14 and 12
FLAT = {"synthetic-users": 50, "synthetic-items": 80, "users-per-client": 14}


@pytest.fixture(autouse=True)
def _flower_identity():
    """Messages are stamped with the run's identity, which a ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _cfg(**over) -> ExperimentConfig:
    return ExperimentConfig.from_flat({**FLAT, **over})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    cfg = _cfg()
    out = tmp_path_factory.mktemp("shards")
    return cfg, population(cfg), shards.write_shards(cfg, population(cfg), out)


# ------------------------------------------------------------------------------- what a device holds
def test_a_device_shard_holds_its_own_users_histories_and_no_one_elses(fleet):
    cfg, pop, folders = fleet
    assert [f.name for f in folders] == ["device-0", "device-1", "device-2"]
    seqs, everyone = pop.dataset.sequences, set(range(pop.dataset.num_users))
    for pid, folder in enumerate(folders):
        assert sorted(p.name for p in folder.iterdir()) == ["histories.npz", "manifest.json"]
        with np.load(folder / "histories.npz", allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
        assert sorted(raw) == ["items", "offsets", "user_ids", "users"]
        mine = pop.clients[pid]
        np.testing.assert_array_equal(raw["users"], mine)
        np.testing.assert_array_equal(raw["user_ids"], pop.dataset.user_ids[mine])
        held = [raw["items"][a:b] for a, b in zip(raw["offsets"][:-1], raw["offsets"][1:])]
        assert len(held) == len(mine) and all(np.array_equal(h, seqs[u]) for h, u in zip(held, mine))
        # nothing else: every item stored belongs to one of its users' histories, in order
        assert raw["offsets"][0] == 0 and raw["offsets"][-1] == len(raw["items"]) == sum(len(seqs[u]) for u in mine)
        others = everyone - set(mine.tolist())
        assert not set(raw["users"].tolist()) & others
        assert not set(raw["user_ids"].tolist()) & set(pop.dataset.user_ids[sorted(others)].tolist())
        # the manifest: counts and digests, no history
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["partition-id"] == pid and manifest["num-partitions"] == 3
        assert manifest["num-items"] == pop.dataset.num_items == 80 and manifest["users"] == len(mine)
        assert manifest["settings"] == {"cloud-fraction": 0.2, "seed": 0, "users-per-client": 14}
        assert manifest["fingerprint"] == shards.fingerprint(cfg, pop, pid).as_dict()
        assert not any(isinstance(v, list) and len(v) > 1 for v in manifest.values() if v != manifest["files"])


def test_a_device_builds_the_same_client_data_from_its_shard_without_the_population(fleet, monkeypatch):
    cfg, pop, folders = fleet
    derived = [client_data(cfg, pid) for pid in range(3)]

    def no_population(*_):
        raise AssertionError("a device with a shard must not derive the population")

    import clients.node
    import fedkd.edge
    monkeypatch.setattr(fedkd.edge, "population", no_population)
    monkeypatch.setattr(clients.node, "population", no_population)
    for pid, folder in enumerate(folders):
        got = shard_client_data(cfg, shards.load_shard(folder))
        want = derived[pid]
        assert (got.partition_id, got.num_items, got.tier) == (want.partition_id, want.num_items, want.tier)
        np.testing.assert_array_equal(got.users, want.users)
        for a, b in zip(got.train, want.train):
            np.testing.assert_array_equal(a, b)
        for split in ("valid", "test"):
            g, w = getattr(got, split), getattr(want, split)
            for f in ("histories", "targets", "users"):
                np.testing.assert_array_equal(getattr(g, f), getattr(w, f))
            assert all(np.array_equal(x, y) for x, y in zip(g.seen, w.seen, strict=True))
    # the ClientApp's setup: node config names the shard; the run config's data is never read
    from clients.node import fingerprint, setup
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "shard": str(folders[1])}, state=RecordDict(),
                  run_config={**FLAT, "data-path": "/server/only/u.data"})
    c, data = setup(ctx)
    assert data.partition_id == 1 and len(data.users) == 14 and c.data_path == "/server/only/u.data"
    assert fingerprint(ctx, c, data) == shards.load_shard(folders[1]).fingerprint
    with pytest.raises(ValueError, match="partition-id 2 but its shard .* is partition 1's"):
        setup(Context(run_id=1, node_id=1, node_config={"partition-id": 2, "shard": str(folders[1])},
                      state=RecordDict(), run_config=FLAT))
    with pytest.raises(ValueError, match="both a 'shard' and a 'data-path'"):
        setup(Context(run_id=1, node_id=1, node_config={"shard": str(folders[1]), "data-path": "/x"},
                      state=RecordDict(), run_config=FLAT))


def test_a_shard_altered_or_missing_is_refused_on_the_device(fleet, tmp_path):
    _, _, folders = fleet
    import shutil
    copy = tmp_path / "device-0"
    shutil.copytree(folders[0], copy)
    with np.load(copy / "histories.npz") as z:
        raw = {k: z[k] for k in z.files}
    raw["items"][3] = raw["items"][3] % 80 + 1  # one interaction changed
    np.savez(copy / "histories.npz", **raw)
    with pytest.raises(ValueError, match="do not match its manifest .* altered or only partly copied"):
        shards.load_shard(copy)
    with pytest.raises(ValueError, match="no shard at .*manifest.json is missing"):
        shards.load_shard(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="already holds shards"):
        shards.write_shards(_cfg(), population(_cfg()), folders[0].parent)


# ------------------------------------------------------------------------------- the fingerprint
def test_the_fingerprint_changes_with_the_data_the_settings_and_the_partition():
    base = shards.fingerprint(_cfg(), population(_cfg()), 0)
    assert base == shards.fingerprint(_cfg(), population(_cfg()), 0)  # stable
    other_data = shards.fingerprint(_cfg(**{"synthetic-mean-length": 11}), population(_cfg(**{
        "synthetic-mean-length": 11})), 0)
    other_split = shards.fingerprint(_cfg(**{"cloud-fraction": 0.3}), population(_cfg(**{"cloud-fraction": 0.3})), 0)
    other_size = shards.fingerprint(_cfg(**{"users-per-client": 13}), population(_cfg(**{"users-per-client": 13})), 0)
    other_part = shards.fingerprint(_cfg(), population(_cfg()), 1)
    assert other_data.data != base.data and other_data.config == base.config
    assert other_split.data == base.data and other_split.config != base.config
    assert other_split.partition != base.partition  # other users in the cloud
    assert other_size.config != base.config and other_size.fleet != base.fleet
    assert (other_part.data, other_part.config, other_part.fleet) == (base.data, base.config, base.fleet)
    assert other_part.partition != base.partition
    # the seed moves everything: the synthetic data and the split
    seeded = shards.fingerprint(_cfg(seed=1), population(_cfg(seed=1)), 0)
    assert seeded.data != base.data and seeded.config != base.config
    # settings typed: 0.2 given as a string of an int-like float or a float agree
    assert shards.partition_settings(_cfg(**{"cloud-fraction": 0.2})) == '{"cloud-fraction":0.2,"seed":0,' \
                                                                         '"users-per-client":14}'


def test_the_partition_digest_is_pinned():
    """Little-endian int64 bytes of (id, count), users, lengths, items: the same on every platform."""
    import hashlib
    digest = shards.partition_digest(2, np.array([5, 9]), [np.array([1, 2, 3]), np.array([4, 4, 1, 2])])
    by_hand = hashlib.sha256(b"fedkd.partition.v1")
    for values in ([2, 2], [5, 9], [3, 4], [1, 2, 3, 4, 4, 1, 2]):
        by_hand.update(np.array(values, dtype="<i8").tobytes())
    assert digest == by_hand.hexdigest() == "c5677c4de5798d5994f314cdbacb8e9f61c1003a5e1df6ceed18fe1756e8facb"


def test_mismatch_names_the_part_that_differs():
    exp = Fingerprint("d" * 64, "c" * 64, "p" * 64, '{"seed":0}')
    assert shards.mismatch(exp, exp, 0) is None
    assert "sent no fingerprint" in shards.mismatch(exp, None, 0)
    assert "data hash dddd" not in shards.mismatch(exp, Fingerprint("e" * 64, "c" * 64, "p" * 64), 0)
    assert "other interactions" in shards.mismatch(exp, Fingerprint("e" * 64, "c" * 64, "p" * 64), 0)
    why = shards.mismatch(exp, Fingerprint("d" * 64, "f" * 64, "p" * 64, '{"seed":1}'), 0)
    assert 'cut with {"seed":1}, this run uses {"seed":0}' in why
    assert "not that of partition 4" in shards.mismatch(exp, Fingerprint("d" * 64, "c" * 64, "q" * 64), 4)


def test_admission_refuses_out_of_range_mismatched_and_duplicate_nodes_in_a_fixed_order():
    def expected(pid):
        return Fingerprint("d", "c", f"p{pid}")

    claims = [Claim(9, 1, expected(1)),                 # a second good node for partition 1
              Claim(5, 0, expected(0)), Claim(3, 1, expected(1)),
              Claim(4, 2, Fingerprint("x", "c", "p2")),  # other data
              Claim(8, 7, expected(7)),                  # beyond the fleet
              Claim(1, 0, None)]                         # no fingerprint
    admitted, refused = shards.admit(claims, num_partitions=3, expected=expected)
    assert [(c.node_id, c.partition_id) for c in admitted] == [(5, 0), (3, 1)]
    assert [(r.node_id, r.partition_id, r.reason) for r in refused] == [
        (1, 0, "fingerprint"), (9, 1, "duplicate"), (4, 2, "fingerprint"), (8, 7, "partition")]
    assert all(r.reason in shards.HANDSHAKE_REASONS for r in refused)
    assert "already held by node 3" in refused[1].detail and "outside 0..2" in refused[3].detail
    assert shards.admit(reversed(claims), num_partitions=3, expected=expected) == (admitted, refused)


# ------------------------------------------------------------------------------- the handshake
class _Grid:
    """A Grid whose nodes are ClientApp contexts answered in-process by the real ClientApp."""

    def __init__(self, contexts, silent=()):
        self.contexts, self.silent, self.timeouts = contexts, set(silent), []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, msgs, timeout=None):
        self.timeouts.append(timeout)
        return [self._answer(m) for m in msgs if m.metadata.dst_node_id not in self.silent]

    def _answer(self, msg):
        """What a SuperNode's runtime sends back: the reply, or an error reply if the app raised."""
        from flwr.app import Error

        from clients.client_app import app
        try:
            return app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as ex:  # as flwr/supernode/runtime/run_clientapp.py
            return Message(Error(code=2, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)


def test_the_server_refuses_a_device_with_a_mismatched_shard_and_logs_why(fleet, tmp_path):
    """Three devices from their shards, a fourth from a shard of other data (seed 1) that claims
    partition 2, a fifth without a partition, a sixth that never answers: the server keeps 0, 1,
    2 and logs the rest."""
    import functools

    from server.transport import Profile, Transport
    cfg, pop, folders = fleet
    other = shards.write_shards(_cfg(seed=1), population(_cfg(seed=1)), tmp_path / "other")

    def ctx(node_id, node_config):
        return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=FLAT)

    grid = _Grid({10 + i: ctx(10 + i, {"shard": str(f)}) for i, f in enumerate(folders)}
                 | {20: ctx(20, {"shard": str(other[2])}), 30: ctx(30, {}), 40: ctx(40, {"shard": str(folders[0])})},
                 silent={40})
    transport = Transport(tmp_path, round_timeout=0.0, wire_payloads=False, profile=Profile(), handshake_timeout=30.0)
    admit = functools.partial(shards.admit, num_partitions=pop.num_clients,
                              expected=lambda pid: shards.fingerprint(cfg, pop, pid))
    nodes = transport.handshake(grid, admit=admit)
    assert [(n.node_id, n.partition_id) for n in nodes] == [(10, 0), (11, 1), (12, 2)]
    lines = [json.loads(x) for x in (tmp_path / "rejections.jsonl").read_text().splitlines()]
    assert [(ln["round"], ln["type"], ln["node_id"], ln["partition_id"], ln["reason"]) for ln in lines] == [
        (0, "query", 30, None, "crashed"), (0, "query", 40, None, "timeout"), (0, "query", 20, 2, "fingerprint")]
    assert "no 'partition-id' in its node config" in lines[0]["detail"]
    assert "within handshake-timeout (30 s)" in lines[1]["detail"] and grid.timeouts == [30.0]
    assert "data hash" in lines[2]["detail"] and "other interactions" in lines[2]["detail"]
    assert len(transport.refused) == 3


# ------------------------------------------------------------------------------- usage meter
def test_the_usage_mod_writes_one_line_per_message_and_summarize_reads_them(fleet, tmp_path):
    from clients.client_app import app
    _, _, folders = fleet
    log = tmp_path / "usage.jsonl"
    ctx = Context(run_id=1, node_id=1, node_config={"shard": str(folders[0]), "usage-log": str(log)},
                  state=RecordDict(), run_config=FLAT)
    reply = app(Message(pack(Content()), dst_node_id=1, message_type="query"), ctx)
    assert not reply.has_error()
    [line] = usage.read(log)
    assert line["type"] == "query" and line["round"] is None and line["peak_rss_mb"] > 10
    assert line["handler_s"] >= 0 and line["process_s"] > line["handler_s"] and not line["error"]
    line.update(peak_rss_mb=300.0, data_mb=350.0)
    lines = [line, {**line, "type": "train", "round": 2, "process_s": 9.0, "peak_rss_mb": 400.0},
             {**line, "type": "train", "round": 1, "process_s": 7.5, "cpus": [0], "memory_limit_mb": 1000.0}]
    s = usage.summarize(lines)
    assert s["messages"] == 3 and s["peak_rss_mb"] == 400.0 and s["memory_limit_mb"] == 1000.0
    assert s["data_mb"] == 350.0 and s["errors"] == 0
    assert [r["round"] for r in s["rounds"]] == [1, 2] and s["rounds"][0]["process_s"] == 7.5
    assert usage.summarize([])["peak_rss_mb"] is None
