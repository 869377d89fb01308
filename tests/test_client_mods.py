"""The ClientApp's mods (clients/mods/) without the engine: each behaviour, and the order of the chain.

The handler is replaced by a stand-in that sends a known update through the same slot the real
handler uses (``clients.mods.update.finish``), so each test sees exactly what a mod did.
The golden runs (tests/test_golden.py) check the whole chain in real rounds.
"""

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.mods import TRAIN_MODS, fault_mod
from clients.mods.update import finish, update_step
from fedkd import streams
from fedkd.codec import PayloadError
from fedkd.config import FAULT_KINDS, ExperimentConfig
from fedkd.faults import corrupt
from fedkd.privacy import clip_update, local_dp
from fedkd.streams import Stream
from wire import Content, from_record, metric_dict, pack, unpack

BASE = {"synthetic-users": 30, "synthetic-items": 40, "synthetic-mean-length": 8}
ROUND, PID = 2, 1


@pytest.fixture(autouse=True)
def _flower_identity():
    """Messages are stamped with the run's identity, which a ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _context(**overrides) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": PID, "num-partitions": 24}, state=RecordDict(),
                   run_config={**BASE, **overrides})


def _train_msg() -> Message:
    return Message(pack(Content(configs={"config": {"round": ROUND, "steps": 4}})), dst_node_id=1,
                   message_type="train")


UPDATE = {"a": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4), "b": np.full(5, 2.0, np.float32)}


def _handler(seen: list):
    """A stand-in for the train handler: the update it would encode is recorded, and the reply
    carries it (the bytes a corruption must break) with the metrics a real reply has."""
    def handle(msg: Message, context: Context) -> Message:
        update = finish({k: v.copy() for k, v in UPDATE.items()})
        seen.append(update)
        return Message(pack(Content(arrays={"update": update}, metrics={"metrics": metric_dict(
            {"num-examples": 3, "steps": 4, "step-limit": 4})})), reply_to=msg)
    return handle


def _app(mods, seen: list) -> ClientApp:
    """A ClientApp whose train handler is the stand-in, wrapped in ``mods`` the way Flower does."""
    app = ClientApp()
    app.train(mods=mods)(_handler(seen))
    return app


def _send(mods, **overrides) -> tuple[dict, Message]:
    seen: list = []
    reply = _app(mods, seen)(_train_msg(), _context(**overrides))
    return seen[0], reply


def test_update_steps_apply_innermost_first_and_only_inside_their_block():
    with update_step(lambda u: {k: v + 1 for k, v in u.items()}):
        with update_step(lambda u: {k: v * 10 for k, v in u.items()}):
            assert finish({"x": np.ones(1)})["x"][0] == 11  # the inner step (x10) acts first
        assert finish({"x": np.ones(1)})["x"][0] == 2
    assert finish({"x": np.ones(1)})["x"][0] == 1


def test_with_nothing_switched_on_the_chain_leaves_update_and_reply_alone():
    update, reply = _send(TRAIN_MODS)
    assert all(np.array_equal(update[k], UPDATE[k]) for k in UPDATE)
    assert unpack(reply.content).metrics["metrics"]["steps"] == 4


def test_local_dp_noises_then_a_malicious_client_boosts_the_noised_update():
    update, _ = _send(TRAIN_MODS, **{"dp-mode": "local", "dp-noise-multiplier": 0.5, "dp-clip-norm": 0.5,
                                     "fault-malicious": str(PID), "fault-malicious-scale": 7.0})
    cfg = ExperimentConfig.from_flat({**BASE, "dp-mode": "local", "dp-noise-multiplier": 0.5, "dp-clip-norm": 0.5})
    noised = local_dp(UPDATE, cfg, streams.rng(cfg.seed, Stream.LOCAL_DP_NOISE, ROUND, PID))
    for k in UPDATE:
        np.testing.assert_array_equal(update[k], (noised[k] * 7.0).astype(np.float32))


def test_a_local_dp_device_refuses_to_send_more_noisy_updates_than_its_cap():
    """Local DP trusts no one: the device counts its noisy updates and refuses the one past
    dp-local-participations itself, whatever the server asks; uncapped, it keeps no count."""
    flat = {"dp-mode": "local", "dp-noise-multiplier": 0.5, "dp-clip-norm": 0.5}
    seen: list = []
    app, context = _app(TRAIN_MODS, seen), _context(**flat, **{"dp-local-participations": 2})
    for _ in range(2):
        app(_train_msg(), context)
    with pytest.raises(RuntimeError, match="device 1 has sent 2 noisy updates, all that dp-local-participations = 2"):
        app(_train_msg(), context)
    assert len(seen) == 2  # the third never reached training
    uncapped = _context(**flat)
    for _ in range(3):
        _app(TRAIN_MODS, seen)(_train_msg(), uncapped)
    assert len(seen) == 5 and "local-dp-sent" not in uncapped.state


def test_local_dp_with_a_secure_rng_draws_fresh_noise_for_the_same_message():
    flat = {"dp-mode": "local", "dp-noise-multiplier": 0.5, "dp-clip-norm": 0.5, "dp-secure-rng": True}
    (a, _), (b, _) = _send(TRAIN_MODS, **flat), _send(TRAIN_MODS, **flat)
    cfg = ExperimentConfig.from_flat({**BASE, **flat})
    seeded = local_dp(UPDATE, cfg, streams.rng(cfg.seed, Stream.LOCAL_DP_NOISE, ROUND, PID))
    for k in UPDATE:
        assert not np.array_equal(a[k], b[k]) and not np.array_equal(a[k], seeded[k])


def test_under_secure_aggregation_central_dp_clips_after_the_malicious_boost():
    update, _ = _send(TRAIN_MODS, **{"secure-aggregation": True, "dp-mode": "central", "dp-clip-norm": 0.5,
                                     "fault-malicious": str(PID), "fault-malicious-scale": 7.0})
    expected, norm = clip_update({k: (v * 7.0).astype(np.float32) for k, v in UPDATE.items()}, 0.5)
    assert norm > 0.5
    for k in UPDATE:
        np.testing.assert_array_equal(update[k], expected[k])


def test_an_honest_client_is_not_boosted_and_central_dp_without_secure_aggregation_clips_on_the_server():
    update, _ = _send(TRAIN_MODS, **{"dp-mode": "central", "fault-malicious": str(PID + 1)})
    assert all(np.array_equal(update[k], UPDATE[k]) for k in UPDATE)


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k not in ("undecodable", "steps")])
def test_a_corruption_breaks_the_uploaded_record_as_fedkd_faults_says(kind):
    update, reply = _send([fault_mod], **{"fault-corrupt": 1.0, "fault-corrupt-kinds": kind})
    sent = from_record(reply.content.array_records["update"])
    expected = corrupt(update, kind)
    assert list(sent) == list(expected)
    for k in expected:
        np.testing.assert_array_equal(sent[k], expected[k])
        assert sent[k].dtype == expected[k].dtype


def test_the_steps_fault_reports_one_step_over_the_limit_and_leaves_the_arrays():
    update, reply = _send([fault_mod], **{"fault-corrupt": 1.0, "fault-corrupt-kinds": "steps"})
    assert unpack(reply.content).metrics["metrics"]["steps"] == 5
    np.testing.assert_array_equal(from_record(reply.content.array_records["update"])["a"], update["a"])


def test_the_undecodable_fault_garbles_the_upload_below_numpy():
    _, reply = _send([fault_mod], **{"fault-corrupt": 1.0, "fault-corrupt-kinds": "undecodable"})
    with pytest.raises(PayloadError, match="array 'update/a' cannot be decoded") as err:
        unpack(reply.content)
    assert err.value.code == "undecodable"


def test_a_crash_raises_before_the_handler_runs():
    seen: list = []
    with pytest.raises(RuntimeError, match=f"client {PID} crashes in round {ROUND}"):
        _app(TRAIN_MODS, seen)(_train_msg(), _context(**{"fault-crash": 1.0}))
    assert seen == []


def test_a_hang_sleeps_past_the_round_timeout_then_replies_as_usual(monkeypatch):
    import clients.mods.faults as faults
    from fedkd.faults import HANG_MARGIN_S
    slept, seen = [], []
    monkeypatch.setattr(faults.time, "sleep", lambda s: slept.append((s, len(seen))))
    reply = _app(TRAIN_MODS, seen)(_train_msg(), _context(**{"fault-hang": 1.0, "round-timeout": 5.0}))
    assert slept == [(5.0 + HANG_MARGIN_S, 0)]  # before any work
    assert len(seen) == 1 and not reply.has_error()
