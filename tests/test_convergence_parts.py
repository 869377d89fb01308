"""The parts issue 21 added to the round loop: server optimizer from the config, distillation
schedule, fixed validation sample, smoothed selection, plateau and target stops."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedkd.config import ExperimentConfig
from fedkd.server_opt import FedAdagrad, FedAvgM, FedYogi
from server import kd_schedule
from server.aggregation import FedAvgStep
from server.compose import make_server_step
from server.evaluation import Evaluator, _sample
from server.kd_schedule import KDSchedule
from server.transport import Node


# the plain server of before issue 21 (FedAvg, constant step, constant distillation); each test
# sets what it exercises on top
PLAIN = {"server-optimizer": "fedavg", "server-lr": 1.0, "server-lr-schedule": "constant", "kd-schedule": "constant"}


def cfg(**kw) -> ExperimentConfig:
    return ExperimentConfig.from_flat({**PLAIN, **kw})


# --- server optimizer -------------------------------------------------------------------
def test_the_defaults_are_the_converged_server():
    """issue 21: FedYogi at eta 0.1 annealed to 5% by cosine, distillation gated."""
    d = ExperimentConfig()
    assert (d.server_optimizer, d.server_lr, d.server_lr_schedule, d.server_lr_final, d.kd_schedule) == \
        ("fedyogi", 0.1, "cosine", 0.05, "gate")
    step = make_server_step(ExperimentConfig.from_flat({"num-rounds": 3}))
    assert isinstance(step.optimizer, FedYogi) and [step.scale(r) for r in (1, 3)] == [1.0, pytest.approx(0.05)]


def test_server_step_follows_the_config_with_flowers_names():
    # byte-identical to the runs before optimizers
    assert isinstance(make_server_step(cfg()).optimizer, FedAvgStep)
    yogi = make_server_step(cfg(**{"server-optimizer": "fedyogi", "server-lr": 0.1, "server-beta-2": 0.9,
                                   "server-tau": 0.01})).optimizer
    assert isinstance(yogi, FedYogi)
    assert yogi.params == {"eta": 0.1, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.9, "tau": 0.01}
    m = make_server_step(cfg(**{"server-optimizer": "fedavgm", "server-lr": 0.5, "server-momentum": 0.9})).optimizer
    assert isinstance(m, FedAvgM) and m.params == {"server_learning_rate": 0.5, "server_momentum": 0.9}
    assert isinstance(make_server_step(cfg(**{"server-optimizer": "fedadagrad"})).optimizer, FedAdagrad)


def test_a_configured_optimizer_steps_by_hand():
    """Two FedAdagrad rounds from the config, against the formula written out."""
    opt = make_server_step(cfg(**{"server-optimizer": "fedadagrad", "server-lr": 0.1, "server-tau": 0.5}))
    x = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    d1, d2 = {"w": np.array([0.5, -1.0], np.float32)}, {"w": np.array([0.5, 1.0], np.float32)}
    x1 = opt.step(x, d1, 1)
    np.testing.assert_allclose(x1["w"], [1 + 0.1 * 0.5 / (0.5 + 0.5), 2 + 0.1 * -1 / (1 + 0.5)], atol=1e-6)
    x2 = opt.step(x1, d2, 2)
    v = np.array([0.5, 2.0])
    np.testing.assert_allclose(x2["w"], x1["w"] + 0.1 * np.array([0.5, 1.0]) / (np.sqrt(v) + 0.5), atol=1e-6)
    assert opt.columns(2) == {}  # a constant learning rate adds no column


def test_server_learning_rate_schedule_by_hand():
    """Cosine over 5 rounds to 0.1 of server-lr: FedAvg at server-lr 0.5 takes steps 0.5 x scale."""
    step = make_server_step(cfg(**{"server-lr": 0.5, "num-rounds": 5, "server-lr-schedule": "cosine",
                                   "server-lr-final": 0.1}))
    scales = [step.scale(r) for r in range(1, 6)]
    want = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (r - 1) / 4)) for r in range(1, 6)]
    np.testing.assert_allclose(scales, want)
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(0.1)
    x, d = {"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)}
    for r in range(1, 6):
        x = step.step(x, d, r)
    np.testing.assert_allclose(x["w"], 0.5 * sum(want), rtol=1e-6)
    assert step.columns(3) == {"server_lr_scale": pytest.approx(0.55)}
    # step: full rate for the first half, the final factor after; FedYogi's eta is scaled the same way
    yogi = make_server_step(cfg(**{"server-optimizer": "fedyogi", "server-lr": 0.1, "num-rounds": 4,
                                   "server-lr-schedule": "step", "server-lr-final": 0.2}))
    assert [yogi.scale(r) for r in (1, 2, 3, 4)] == [1.0, 1.0, 0.2, 0.2]
    ref = make_server_step(cfg(**{"server-optimizer": "fedyogi", "server-lr": 0.02}))
    x0 = {"w": np.array([1.0, -1.0], np.float32)}
    for r in (1, 2):
        yogi.step(x0, d, r), ref.step(x0, d, r)  # same moments
    np.testing.assert_allclose(yogi.step(x0, d, 3)["w"], ref.step(x0, d, 3)["w"], rtol=1e-6)


@pytest.mark.parametrize("kw, key", [
    ({"server-optimizer": "adam"}, "server-optimizer"),
    ({"server-beta-1": 1.0}, "server-beta-1"),
    ({"server-tau": 0.0}, "server-tau"),
    ({"kd-schedule": "cosine"}, "kd-schedule"),
    ({"server-lr-schedule": "linear"}, "server-lr-schedule"),
    ({"server-lr-final": 1.5}, "server-lr-final"),
    ({"val-clients": 10, "protocol": "logits"}, "val-clients"),
    ({"stop-at-target": True}, "stop-at-target"),
    ({"val-smoothing": 0}, "val-smoothing"),
    ({"target-ndcg": 1.5}, "target-ndcg"),
])
def test_bad_values_are_refused_naming_the_option(kw, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        cfg(**kw)


def test_server_settings_that_need_a_global_student_are_named_not_refused_elsewhere():
    """They are defaults of every run: a protocol without a global student runs with them,
    keeps kd-weight constant, and the log names what it does not use."""
    from server.compose import unused_settings

    cloud = SimpleNamespace(refines=False)
    server = {"server-optimizer": "fedyogi", "server-lr-schedule": "cosine", "kd-schedule": "gate"}
    for protocol in ("logits", "local", "proxy"):
        c = cfg(**server, protocol=protocol)
        kd = KDSchedule(c, cloud)
        assert kd.schedule == "constant" and not kd.varies and kd.weight(30) == c.kd_weight
        assert unused_settings(c, kd) == ["server-optimizer = fedyogi", "server-lr-schedule = cosine",
                                          "kd-schedule = gate (kd-weight stays constant)"]
    local_linear = KDSchedule(cfg(**{"protocol": "local", "kd-schedule": "linear"}), cloud)
    assert local_linear.varies and local_linear.weight(11) == pytest.approx(0.5)
    params = cfg(**server)
    assert KDSchedule(params, cloud).schedule == "gate" and unused_settings(params, KDSchedule(params, cloud)) == []


# --- distillation schedule -------------------------------------------------------------------
def test_decaying_schedules():
    cloud = SimpleNamespace(refines=False)
    w = lambda **kw: [KDSchedule(cfg(**kw), cloud).weight(r) for r in (1, 6, 11, 21, 40)]  # noqa: E731
    assert w() == [1.0] * 5
    assert w(**{"kd-schedule": "linear", "kd-decay-rounds": 20, "kd-weight": 2.0}) == [2.0, 1.5, 1.0, 0.0, 0.0]
    assert w(**{"kd-schedule": "exp", "kd-decay-rounds": 5}) == pytest.approx([1.0, 0.5, 0.25, 0.0625, 0.5 ** 7.8])
    assert w(**{"kd-schedule": "linear", "kd-weight": 0.0}) == [0.0] * 5
    assert not KDSchedule(cfg(), cloud).varies and KDSchedule(cfg(**{"kd-schedule": "exp"}), cloud).varies


def test_gate_closes_for_good_once_the_student_passes_the_teacher(monkeypatch):
    scores = iter([0.10, 0.25, 0.31, 0.20])  # the student on the cloud users' validation, round after round
    monkeypatch.setattr(kd_schedule, "evaluate_ranking", lambda *a, **k: SimpleNamespace(ndcg=next(scores)))
    monkeypatch.setattr(kd_schedule, "set_state", lambda model, state: None)
    cloud = SimpleNamespace(refines=False, cloud_valid=None, teacher_score=lambda: 0.30)
    kd = KDSchedule(cfg(**{"kd-schedule": "gate"}), cloud, student=object())
    weights = []
    for r in (1, 2, 3, 4):
        weights.append(kd.weight(r))
        cols = kd.observe(r, {})
    assert weights == [1.0, 1.0, 1.0, 0.0]  # round 3's validation passed 0.30: off from round 4
    assert kd.gated_at == 3 and kd.weight(50) == 0.0  # the dip in round 4 does not reopen it
    assert cols == {"kd_weight": 0.0, "student_cloud_val_ndcg": 0.20, "teacher_cloud_val_ndcg": 0.30}
    assert kd.observe(5, None) == {"kd_weight": 0.0, "student_cloud_val_ndcg": "", "teacher_cloud_val_ndcg": ""}
    assert KDSchedule(cfg(), cloud).observe(1, {}) == {}  # constant: no columns, metrics.csv as before
    again = KDSchedule(cfg(**{"kd-schedule": "gate"}), cloud)
    again.load_state_dict(kd.state_dict())
    assert again.weight(4) == 0.0 and again.weight(3) == 1.0


def test_the_train_message_carries_the_weight_only_when_it_varies():
    from server.protocols.base import Protocol
    cloud = SimpleNamespace(refines=False, proxy=np.ones((8, 5), dtype=np.int64), num_items=30)
    targets = SimpleNamespace(ids=np.array([[1, 2, 3], [4, 5, 6]]), probs=np.full((2, 3), 0.3, np.float32))
    rows = np.array([0, 1])
    plain = Protocol(cfg(), cloud, kd=KDSchedule(cfg(), cloud)).content(1, rows, targets)
    assert "kd-weight" not in plain.configs["config"]
    c = cfg(**{"kd-schedule": "linear", "kd-decay-rounds": 4})
    linear = Protocol(c, cloud, kd=KDSchedule(c, cloud))
    assert linear.content(3, rows, targets).configs["config"]["kd-weight"] == 0.5
    assert linear.targets(np.zeros((2, 5), np.int64), 5) is None  # weight 0: no proxy batch goes down


@pytest.mark.parametrize("name", ["params", "logits", "local", "proxy"])
def test_every_protocol_uses_the_experiments_schedule(name):
    """The schedule the loop observes (and checkpoints) is the one the protocol asks: a
    protocol that built its own would keep distilling after the gate closed."""
    from server.protocols import PROTOCOLS
    c = cfg(**{"protocol": name})
    kd = KDSchedule(c, SimpleNamespace(refines=False))
    proto = PROTOCOLS[name].__new__(PROTOCOLS[name])
    parts = {"student": None, "fleet": None, "aggregator": None, "server_step": None}
    try:
        PROTOCOLS[name].__init__(proto, c, SimpleNamespace(refines=False), kd=kd, **parts)
    except (AttributeError, TypeError):  # a part stubbed with None; the schedule is set first
        pass
    assert proto.kd is kd


def test_the_client_takes_the_servers_weight():
    from clients.client_app import _kd_weight
    from wire import Content
    c = cfg(**{"kd-weight": 2.0})
    assert _kd_weight(c, Content(configs={"config": {"round": 1}})) == 2.0
    assert _kd_weight(c, Content(configs={"config": {"round": 1, "kd-weight": 0.25}})) == 0.25


# --- validation sample, smoothing and stops -----------------------------------------------------
def nodes(n: int) -> list[Node]:
    return [Node(node_id=100 + i, partition_id=i, tier=0, examples=5) for i in range(n)]


def test_validation_sample_is_fixed_per_seed():
    fleet = nodes(50)
    a, b = _sample(fleet, 10, seed=0), _sample(fleet, 10, seed=0)
    assert a == b and len(a) == 10 and len({n.partition_id for n in a}) == 10
    assert {n.partition_id for n in _sample(fleet, 10, seed=1)} != {n.partition_id for n in a}
    assert _sample(fleet, 0, seed=0) == fleet and _sample(fleet, 80, seed=0) == fleet


class Scripted(Evaluator):
    """An evaluator whose validation scores are given, to test selection and stops alone."""

    def __init__(self, scores, **kw):
        super().__init__(cfg(**kw), SimpleNamespace(nodes=nodes(20)), None, None, initial_state=None)
        self.scores, self.asked = iter(scores), []

    def evaluate(self, grid, state, splits, r, *, full_width=False, nodes=None):
        self.asked.append(len(nodes))
        return {"valid": {"ndcg": next(self.scores), "hr": 0.0, "n": 1, "rows": [], "bytes": 0}}


def run(ev: Evaluator, n: int) -> list[int]:
    """Validate rounds 1..n (stopping as the loop does); returns the rounds validated."""
    done = []
    for r in range(1, n + 1):
        ev.validate(None, {"round": r}, r)
        done.append(r)
        if ev.plateaued:
            break
    return done


def test_single_best_selection_and_plateau_stop():
    ev = Scripted([0.1, 0.3, 0.2, 0.25, 0.29, 0.5], **{"stop-patience": 3, "val-clients": 5})
    assert run(ev, 6) == [1, 2, 3, 4, 5]  # three validations without beating 0.3
    assert ev.best[:2] == (0.3, 2) and ev.best[2] == {"round": 2}
    assert ev.asked == [5] * 5  # the fixed sample, every time


def test_smoothing_keeps_one_lucky_validation_from_choosing():
    scores = [0.10, 0.30, 0.12, 0.20, 0.22, 0.21]  # round 2 is a spike
    single, smooth = Scripted(scores), Scripted(scores, **{"val-smoothing": 3})
    run(single, 6), run(smooth, 6)
    assert single.best[1] == 2
    assert smooth.best[1] == 6 and smooth.best[0] == pytest.approx((0.20 + 0.22 + 0.21) / 3)


def test_target_records_the_first_round_that_reaches_it():
    ev = Scripted([0.1, 0.19, 0.21, 0.3], **{"target-ndcg": 0.2})
    run(ev, 4)
    assert ev.target == {"round": 3}
    assert Scripted([0.1], **{}).target is None


# --- reference scores at the end of a run ------------------------------------------------------
def test_reference_scores_are_the_teacher_and_popularity_on_the_edge_users():
    """The teacher entry scores the given model on the edge users' items; without a teacher
    (kd-weight 0) there is only popularity, which is the same either way."""
    import torch

    from fedkd.metrics import evaluate_ranking
    from fedkd.models import build_model
    from fedkd.population import population
    from fedkd.samples import eval_set
    from server.references import reference_step

    c = cfg(**{"synthetic-users": 40, "synthetic-items": 60})
    pop = population(c)
    teacher = build_model(c.teacher_model(pop.dataset.num_items), seed=3)
    with_teacher = reference_step(c, teacher)(None)["references"]
    alone = reference_step(c, None)(None)["references"]
    assert set(with_teacher) == {"teacher", "popularity"} and set(alone) == {"popularity"}
    assert with_teacher["popularity"] == alone["popularity"]
    edge = sorted(int(u) for cl in pop.clients for u in cl)
    assert len(edge) == 32 and not set(edge) & {int(u) for u in pop.cloud_users}
    with torch.no_grad():
        want = evaluate_ranking(teacher, eval_set(pop.dataset.sequences, edge, "test", c.max_len), k=10)
    assert with_teacher["teacher"]["test_ndcg"] == pytest.approx(want.ndcg)
    assert with_teacher["teacher"]["val_ndcg"] != with_teacher["teacher"]["test_ndcg"]


# --- warm start --------------------------------------------------------------------------
def test_warm_start_distils_the_teacher_into_the_student_before_round_1(tmp_path):
    """The server's warm start moves the student towards the teacher on the proxy set (its KD
    loss falls), repeats exactly for a seed, and is refused where there is no global student."""
    import dataclasses

    from fedkd.local import get_state
    from fedkd.models import build_model
    from server.cloud import Cloud

    base = cfg(**{"synthetic-users": 40, "synthetic-items": 60, "teacher-epochs": 1, "cache-dir": str(tmp_path),
                  "warm-start-steps": 1})
    cloud = Cloud(base)  # one teacher for every variant below

    def warm(**kw):
        cloud.cfg = dataclasses.replace(base, **kw)
        student = build_model(base.student_model(cloud.num_items), seed=0)
        return cloud.warm_start(student), get_state(student)

    short, _ = warm(warm_start_steps=2)
    info, state = warm(warm_start_steps=60)
    again, same = warm(warm_start_steps=60)
    _, with_cloud = warm(warm_start_steps=60, warm_start_cloud=True)
    assert info["steps"] == 60 and info["loss"] < short["loss"]
    assert info == again and all(np.array_equal(state[k], same[k]) for k in state)
    assert any(not np.array_equal(state[k], with_cloud[k]) for k in state)
    # a distillation step: only where the students distil and there is a global student
    from server.compose import unused_settings

    assert cfg(**{"warm-start-steps": 5}).warms_up
    for kw, why in (({"kd-weight": 0.0}, "kd-weight is 0"), ({"protocol": "logits"}, "no global student")):
        c = cfg(**{"warm-start-steps": 5, **kw})
        assert not c.warms_up and unused_settings(c, KDSchedule(c, SimpleNamespace(refines=False))) == \
            [f"warm-start-steps = 5 ({why})"]


def test_the_run_plots_keep_their_names_with_reference_lines(tmp_path):
    from fedkd.plots import plot_run

    rows = [{"round": r, "val_ndcg": 0.1 * r, "val_hr": 0.2 * r, "cum_bytes": 1e6 * r} for r in (1, 2)]
    paths = plot_run(rows, tmp_path, k=10, title="t", references={"teacher": 0.15, "popularity": 0.05})
    assert [p.name for p in paths] == ["metrics_vs_round.png", "metrics_vs_bytes.png"]
    assert all(p.is_file() for p in paths)
