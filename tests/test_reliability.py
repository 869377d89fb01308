"""Reliability without the simulation engine: every rejection reason, robust aggregation,
fault draws, checkpoints, and config validation messages.

Replies are built by the same functions the ClientApp uses (encode, corrupt, pack, garble)
and checked by the server's own ``server.replies.accept`` with the params protocol's decoder, on
real Flower ``Message`` objects.
"""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message

from fedkd import checkpoint
from fedkd.aggregate import bound_norms, combine, norm_outliers, trimmed_mean, update_norm, weighted_mean
from fedkd.codec import REASONS, PayloadError, encode_state
from fedkd.config import FAULT_KINDS, ExperimentConfig
from fedkd.faults import EXPECTED_REASON, corrupt, draw_fault
from fedkd.local import get_state
from fedkd.models import build_model
from fedkd.nested import nested_mean
from wire import Content, garble, message_nbytes, metric_dict, pack
from server.kd_schedule import KDSchedule
from server.protocols.params import ParamsProtocol
from server.replies import accept
from server.transport import Node, Profile, Transport

NUM_ITEMS = 30


@pytest.fixture(autouse=True)
def _flower_identity():
    """Messages are stamped with the run's identity, which a ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _server(tmp_path, **overrides) -> SimpleNamespace:
    """The server parts validation needs: the params protocol (the student's layout and each
    client's width) and the transport that logs rejections."""
    cfg = ExperimentConfig.from_flat({"student-dim": 8, "max-len": 10, **overrides})
    full = cfg.student_model(NUM_ITEMS)
    fleet = SimpleNamespace(full_model=full, width_of={p: 8 for p in range(10)})
    cloud = SimpleNamespace(num_items=NUM_ITEMS, refines=False)
    protocol = ParamsProtocol(cfg, cloud, student=build_model(full, seed=0), fleet=fleet, aggregator=None,
                              server_step=None, kd=KDSchedule(cfg, cloud))
    transport = Transport(tmp_path, round_timeout=0.0, wire_payloads=False, profile=Profile())
    return SimpleNamespace(cfg=cfg, full_model=full, protocol=protocol, transport=transport)


def _update(srv, seed: int = 0, scale: float = 0.01) -> dict:
    layout = get_state(build_model(srv.full_model, seed=0))
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in layout.items()}


def _reply(srv, pid: int, *, fault: str | None = None, update=None, steps: int = 4, loss: float = 1.0):
    """(node, reply message, (down, up) bytes) as a client with ``fault`` would send it."""
    arrays = {"update": encode_state(update or _update(srv, pid), bits=srv.cfg.quant_bits, stochastic=False)}
    if fault in FAULT_KINDS:
        arrays["update"] = corrupt(arrays["update"], fault)
    reported = steps + 1 if fault == "steps" else steps  # allowed 4 below
    rd = pack(Content(arrays=arrays, metrics={"metrics": metric_dict(
        {"num-examples": 10 + pid, "steps": reported, "loss": loss})}))
    if fault == "undecodable":
        garble(rd, "update")
    msg = Message(rd, dst_node_id=0, message_type="train")
    return Node(100 + pid, pid, 0, 10), msg, (40_000, message_nbytes(msg))


def _accept(srv, replies):
    return accept([(n, m) for n, m, _ in replies], 1, decode=srv.protocol.decode,
                  allowed={n.partition_id: 4 for n, _, _ in replies}, sizes={n.partition_id: s for n, _, s in replies},
                  max_reply_bytes=srv.cfg.max_reply_bytes, norm_reject=srv.cfg.norm_reject, transport=srv.transport)


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_injected_corruption_is_rejected_with_its_reason(tmp_path, kind):
    srv = _server(tmp_path)
    good, bad = _reply(srv, 0), _reply(srv, 1, fault=kind)
    accepted, rejected = _accept(srv, [good, bad])
    assert [u.node.partition_id for u in accepted] == [0]
    assert rejected == {1: EXPECTED_REASON[kind]}
    [line] = [json.loads(x) for x in (tmp_path / "rejections.jsonl").read_text().splitlines()]
    assert line["reason"] == EXPECTED_REASON[kind] and line["partition_id"] == 1 and line["detail"]


@pytest.mark.parametrize("mutate, code", [
    (lambda a: a.update(extra=np.zeros(3, np.float32)), "unexpected-key"),
    (lambda a: a["scale"].__setitem__(0, -1.0), "malformed"),
    (lambda a: a["scale"].__setitem__(0, 3e38), "non-finite"),  # finite scale, decoded values overflow
])
def test_payload_invariants_have_their_own_reasons(tmp_path, mutate, code):
    srv = _server(tmp_path)
    node, msg, _ = _reply(srv, 0)
    arrays = {"update": encode_state(_update(srv), bits=8, stochastic=False)}
    mutate(arrays["update"])
    msg = Message(pack(Content(arrays=arrays, metrics={"metrics": {"num-examples": 3, "steps": 4, "loss": 1.0}})),
                  dst_node_id=0, message_type="train")
    _, rejected = _accept(srv, [(node, msg, (40_000, message_nbytes(msg)))])
    assert rejected == {0: code}


@pytest.mark.parametrize("metrics, code", [
    ({"num-examples": 3, "steps": 4}, "missing-key"),
    ({"num-examples": 3, "steps": 4, "loss": float("nan")}, "non-finite"),
    ({"num-examples": 3, "steps": -1, "loss": 1.0}, "steps"),
    ({"num-examples": -3, "steps": 4, "loss": 1.0}, "malformed"),
])
def test_reply_metrics_are_checked(tmp_path, metrics, code):
    srv = _server(tmp_path)
    arrays = {"update": encode_state(_update(srv), bits=8, stochastic=False)}
    msg = Message(pack(Content(arrays=arrays, metrics={"metrics": metrics})), dst_node_id=0, message_type="train")
    _, rejected = _accept(srv, [(Node(1, 0, 0, 3), msg, (40_000, message_nbytes(msg)))])
    assert rejected == {0: code}


def test_max_reply_bytes_is_the_size_limit_when_set(tmp_path):
    srv = _server(tmp_path, **{"max-reply-bytes": 1000})
    _, rejected = _accept(srv, [_reply(srv, 0)])
    assert rejected == {0: "oversized"}


def test_a_boosted_update_is_rejected_by_norm_and_honest_ones_pass(tmp_path):
    srv = _server(tmp_path, **{"norm-reject": 5.0})
    replies = [_reply(srv, p) for p in range(5)] + [_reply(srv, 5, update={k: 100 * v for k, v in
                                                                           _update(srv, 5).items()})]
    accepted, rejected = _accept(srv, replies)
    assert rejected == {5: "norm"} and len(accepted) == 5


def test_every_reason_code_is_documented():
    doc = (__import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    for code in REASONS:
        assert f"`{code}`" in doc, code
    with pytest.raises(ValueError, match="unknown rejection reason"):
        PayloadError("bad-luck", "x")


# ---------------------------------------------------------------------- robust aggregation
def test_trimmed_mean_drops_the_extremes_per_coordinate():
    ups = [{"w": np.array([1.0, 10.0], np.float32)}, {"w": np.array([2.0, -50.0], np.float32)},
           {"w": np.array([3.0, 20.0], np.float32)}, {"w": np.array([100.0, 30.0], np.float32)}]
    out = trimmed_mean(ups, [1, 1, 1, 1], trim=0.25)  # one dropped at each end of each coordinate
    assert out["w"].tolist() == [2.5, 15.0]
    weighted = trimmed_mean(ups, [1, 3, 1, 1], trim=0.25)  # kept values weighted by examples
    assert weighted["w"][0] == pytest.approx((2 * 3 + 3) / 4)


def test_trimmed_mean_with_no_trim_is_the_weighted_mean():
    rng = np.random.default_rng(1)
    ups = [{"a": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(5)]
    w = [1, 2, 3, 4, 5]
    np.testing.assert_allclose(trimmed_mean(ups, w, trim=0.0)["a"], weighted_mean(ups, w)["a"], rtol=1e-6)


def test_norm_bounding_scales_only_the_outlier():
    ups = [{"a": np.full(4, 1.0, np.float32)}, {"a": np.full(4, 1.1, np.float32)}, {"a": np.full(4, 50.0, np.float32)}]
    out, factors = bound_norms(ups, 2.0)
    assert factors[:2] == [1.0, 1.0] and out[0] is not ups[0] and np.array_equal(out[0]["a"], ups[0]["a"])
    assert update_norm(out[2]) == pytest.approx(2.0 * update_norm(ups[1]), rel=1e-6)  # median norm is 2.2
    assert norm_outliers([1.0, 1.1, 50.0], 2.0) == [False, False, True]
    assert norm_outliers([1.0, 50.0], 0.0) == [False, False]


@pytest.mark.parametrize("opts", [{}, {"aggregation": "trimmed-mean", "trim_fraction": 0.2, "norm_bound": 2.0}])
def test_aggregation_does_not_depend_on_reply_order(opts):
    from fedkd.models import ModelConfig
    cfg = ModelConfig(kind="sasrec", num_items=20, dim=8, blocks=1, heads=2, max_len=6, dropout=0.0)
    state = get_state(build_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    entries = [(pid, 8, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()},
                float(rng.integers(1, 50))) for pid in range(12)]
    ref, _ = combine(entries, cfg, **opts)
    for seed in range(5):
        shuffled = entries[:]
        random.Random(seed).shuffle(shuffled)
        got, _ = combine(shuffled, cfg, **opts)
        assert all(np.array_equal(ref[k], got[k]) for k in ref)  # bit-identical
    if not opts:  # the defaults are exactly the FedAvg path of before
        old = nested_mean([(w, u) for _, w, u, _ in entries], [wt for *_, wt in entries], cfg)
        assert all(np.array_equal(ref[k], old[k]) for k in ref)


def test_trimmed_mean_shrugs_off_a_boosted_client_that_the_mean_follows():
    from fedkd.models import ModelConfig
    cfg = ModelConfig(kind="meanpool", num_items=20, dim=8, blocks=1, heads=1, max_len=6, dropout=0.0)
    state = get_state(build_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    honest = [{k: 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()}
              for _ in range(19)]
    evil = {k: 100 * v for k, v in honest[0].items()}
    entries = [(p, 8, u, 1.0) for p, u in enumerate(honest + [evil])]
    clean, _ = combine([(p, 8, u, 1.0) for p, u in enumerate(honest)], cfg)
    mean, _ = combine(entries, cfg)
    robust, _ = combine(entries, cfg, aggregation="trimmed-mean", trim_fraction=0.1, norm_bound=3.0)
    err = {name: update_norm({k: u[k] - clean[k] for k in clean}) for name, u in (("mean", mean), ("robust", robust))}
    assert err["robust"] < 0.2 * err["mean"]


# ---------------------------------------------------------------------- fault draws
def test_fault_draws_are_seeded_per_client_and_round_with_the_configured_rates():
    cfg = ExperimentConfig.from_flat({"fault-crash": 0.2, "fault-corrupt": 0.1})
    draws = [draw_fault(cfg, r, p) for r in range(1, 41) for p in range(100)]
    assert draws == [draw_fault(cfg, r, p) for r in range(1, 41) for p in range(100)]
    assert draws.count("crash") / len(draws) == pytest.approx(0.2, abs=0.02)
    corrupt_share = sum(d in FAULT_KINDS for d in draws) / len(draws)
    assert corrupt_share == pytest.approx(0.1, abs=0.015)
    assert {d for d in draws if d in FAULT_KINDS} == set(FAULT_KINDS)  # every kind occurs
    other_seed = ExperimentConfig.from_flat({"fault-crash": 0.2, "fault-corrupt": 0.1, "seed": 1})
    assert draws != [draw_fault(other_seed, r, p) for r in range(1, 41) for p in range(100)]
    assert draw_fault(ExperimentConfig(), 1, 0) is None


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_is_written_atomically_and_refuses_another_config(tmp_path):
    cfg = ExperimentConfig().to_flat()
    (tmp_path / "metrics.csv").write_text("round\n1\n")
    checkpoint.save(tmp_path, {"round": 1, "config": cfg, "files": checkpoint.file_sizes(tmp_path, ["metrics.csv"])})
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    np.random.seed(5)
    expected = np.random.random()
    np.random.seed(5)
    checkpoint.save(tmp_path, {"round": 2, "config": cfg, "files": {}})
    np.random.random()  # the global stream moves on after the checkpoint ...
    ck = checkpoint.load(tmp_path, {**cfg, "resume": True, "progress": False})  # these two may differ
    checkpoint.set_rng_states(ck["rng"])
    assert ck["round"] == 2 and np.random.random() == expected  # ... and a resume puts it back
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in kd-weight: 1.0 -> 0.5"):
        checkpoint.load(tmp_path, {**cfg, "kd-weight": 0.5})
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nowhere", cfg)


def test_a_checkpoint_resumes_under_a_later_fedkd_whose_new_or_changed_knobs_it_never_used(tmp_path):
    """A knob added later (absent from the checkpoint, asked at its default) or a default changed
    for a knob the run did not use (the synthetic data's size under a data-path) keeps the
    checkpoint resumable; the same change where it matters does not."""
    now = ExperimentConfig().to_flat()
    old = {k: v for k, v in now.items() if k != "round-deadline"}  # a fedkd before round-deadline
    ml = {"data-path": "/data/u.data"}
    checkpoint.save(tmp_path, {"round": 4, "config": {**old, **ml, "synthetic-users": 300}, "files": {}})
    assert checkpoint.load(tmp_path, {**now, **ml, "synthetic-users": 100})["round"] == 4
    with pytest.raises(ValueError, match=r"in round-deadline: None -> 5.0"):
        checkpoint.load(tmp_path, {**now, **ml, "synthetic-users": 100, "round-deadline": 5.0})
    checkpoint.save(tmp_path, {"round": 4, "config": {**old, "synthetic-users": 300}, "files": {}})  # synthetic data
    with pytest.raises(ValueError, match=r"in synthetic-users: 300 -> 100"):
        checkpoint.load(tmp_path, {**now, "synthetic-users": 100})


def test_truncate_cuts_appended_files_back_and_removes_rewritten_ones(tmp_path):
    (tmp_path / "metrics.csv").write_text("round\n1\n2\n")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "test_per_client_r1.csv").write_text("x\n")
    checkpoint.truncate(tmp_path, {"metrics.csv": len("round\n1\n"), "test_per_client_r1.csv": 2},
                        ["summary.json", "test_per_client*.csv"])
    assert (tmp_path / "metrics.csv").read_text() == "round\n1\n"
    assert not (tmp_path / "summary.json").exists() and (tmp_path / "test_per_client_r1.csv").exists()


# ---------------------------------------------------------------------- config validation
NUMERIC = [(k, d) for k, d, _ in ExperimentConfig.help_table() if type(d) in (int, float)]


@pytest.mark.parametrize("key, default", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_key_refuses_nonsense_naming_key_value_and_what_is_allowed(key, default):
    bad = [-1] if type(default) is int else [float("nan"), float("inf")]
    for value in bad:
        with pytest.raises(ValueError) as err:
            ExperimentConfig.from_flat({key: value})
        assert f"'{key}' has invalid value {value!r}: allowed" in str(err.value)


@pytest.mark.parametrize("flat, message", [
    ({"fault-crash": 1.5}, "'fault-crash' has invalid value 1.5: allowed a probability in [0, 1]"),
    ({"fault-crash": 0.6, "fault-corrupt": 0.5}, "'fault-corrupt' has invalid value 0.5: allowed at most 1 - "
                                                 "fault-crash - fault-hang = 0.4"),
    ({"fault-hang": 0.1}, "'fault-hang' has invalid value 0.1: allowed 0 unless round-timeout > 0"),
    ({"fault-corrupt-kinds": "nan,gremlins"}, "'fault-corrupt-kinds' has invalid value 'nan,gremlins': allowed "
                                              "distinct comma-separated names from nan, inf"),
    ({"fault-corrupt": 0.1, "protocol": "local"}, "'fault-corrupt' has invalid value 0.1: allowed 0 with "
                                                  "protocol = local"),
    ({"fault-malicious": "3,x"}, "'fault-malicious' has invalid value '3,x': allowed distinct comma-separated "
                                 "partition ids"),
    ({"fault-malicious": "3", "protocol": "logits"}, "'fault-malicious' has invalid value '3': allowed empty "
                                                     "with protocol = logits"),
    ({"aggregation": "krum"}, "'aggregation' has invalid value 'krum': allowed mean or trimmed-mean"),
    ({"trim-fraction": 0.5}, "'trim-fraction' has invalid value 0.5: allowed a number in [0, 0.5)"),
    ({"norm-bound": 0.5}, "'norm-bound' has invalid value 0.5: allowed 0 (off) or a finite multiple"),
    ({"aggregation": "trimmed-mean", "protocol": "logits"}, "'aggregation' has invalid value 'trimmed-mean': "
                                                            "allowed its default with protocol = logits"),
    ({"min-replies": 0}, "'min-replies' has invalid value 0: allowed an integer >= 1"),
    ({"resume": True, "protocol": "local"}, "'resume' has invalid value True: allowed false with protocol = local"),
    ({"aggregation": 3}, None),  # a number where text is expected still fails on its value
])
def test_reliability_settings_that_cannot_work_are_refused(flat, message):
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_flat(flat)
    if message:
        assert message in str(err.value)


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"Unknown config key 'fault-crashes'.*fault-crash"):
        ExperimentConfig.from_flat({"fault-crashes": 0.1})


def test_malicious_id_beyond_the_fleet_fails_before_the_engine_starts(tmp_path):
    from simulations.runner import run_experiment
    with pytest.raises(ValueError, match=r"'fault-malicious' has invalid value '99': allowed partition ids in "
                                         r"0\.\.39"):
        run_experiment({"fault-malicious": "99", "synthetic-users": 50, "output-dir": str(tmp_path)})


def test_resume_is_refused_with_error_feedback_whose_device_files_cannot_roll_back():
    with pytest.raises(ValueError, match="'resume'.*error-feedback"):
        ExperimentConfig(resume=True, error_feedback=True)


def test_fault_audit_paired_pools_per_user_differences_over_seeds(tmp_path):
    from simulations.fault_audit import paired

    def folder(name, ndcgs):
        d = tmp_path / name
        d.mkdir()
        rows = "\n".join(f"{i},0,16,1,0,{v}" for i, v in enumerate(ndcgs))
        (d / "test_per_client.csv").write_text("partition_id,tier,width,count,hr_sum,ndcg_sum\n" + rows + "\n")
        return d

    dirs = [folder("c0", [0.2, 0.4]), folder("f0", [0.1, 0.4]), folder("c1", [0.5, 0.5]), folder("f1", [0.5, 0.7])]
    text = paired(dirs)
    lines = text.splitlines()
    assert "| -0.05000 [" in lines[2] and "-16.7%" in lines[2]   # (0.1+0.4)/2 - (0.2+0.4)/2
    assert "| +0.10000 [" in lines[3]
    assert lines[4].startswith("| pooled (2 pairs)") and "| +0.02500 [" in lines[4]  # mean of -0.1, 0, 0, 0.2
    with pytest.raises(SystemExit, match="two by two"):
        paired(dirs[:3])
