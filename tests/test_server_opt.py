"""Server optimizers (fedkd.server_opt): each against a two-round example worked by hand,
state_dict round trips, and agreement with Flower 1.41's own strategies on the same numbers.

The hand example: two arrays, ``w`` (3 entries) and ``b`` (1 entry, never updated),
    x0 = w [1, -2, 0],   b [0.5]
    round 1 mean update d1 = w [0.4, -0.2, 1.0],  b [0]
    round 2 mean update d2 = w [0.2,  0.6, 0.05], b [0]
The third entry of ``w`` makes FedYogi's sign flip in round 2 (v > d2^2 there).
"""

import math
import pickle

import numpy as np
import pytest

from fedkd.aggregate import apply_update
from fedkd.server_opt import OPTIMIZERS, make_server_optimizer

X0 = {"w": np.array([1.0, -2.0, 0.0], np.float32), "b": np.array([0.5], np.float32)}
D1 = {"w": np.array([0.4, -0.2, 1.0], np.float32), "b": np.array([0.0], np.float32)}
D2 = {"w": np.array([0.2, 0.6, 0.05], np.float32), "b": np.array([0.0], np.float32)}


def two_rounds(opt):
    x1 = opt.step(X0, D1)
    x2 = opt.step(x1, D2)
    return x1, x2


def close(got, want_w, want_b=0.5):
    np.testing.assert_allclose(got["w"], np.array(want_w), rtol=0, atol=2e-6)
    np.testing.assert_allclose(got["b"], np.array([want_b]), rtol=0, atol=1e-7)
    assert got["w"].dtype == np.float32


def test_fedavg_by_hand():
    x1, x2 = two_rounds(make_server_optimizer("fedavg", eta=0.5))
    close(x1, [1.2, -2.1, 0.5])                 # x0 + 0.5 * d1
    close(x2, [1.3, -1.8, 0.525])               # x1 + 0.5 * d2


def test_fedavg_eta_one_is_applying_the_mean_update():
    opt = make_server_optimizer("fedavg")
    assert opt.eta == 1.0
    for a, b in zip(two_rounds(opt), (apply_update(X0, D1, 1.0),
                                      apply_update(apply_update(X0, D1, 1.0), D2, 1.0))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_fedavgm_by_hand():
    x1, x2 = two_rounds(make_server_optimizer("fedavgm", server_learning_rate=0.5, server_momentum=0.9))
    # round 1: g1 = -d1 = [-0.4, 0.2, -1]; momentum = g1; x1 = x0 - 0.5 g1
    close(x1, [1.2, -2.1, 0.5])
    # round 2: g2 = [-0.2, -0.6, -0.05]; momentum = 0.9 g1 + g2 = [-0.56, -0.42, -0.95]; x2 = x1 - 0.5 mom
    close(x2, [1.48, -1.89, 0.975])


def test_fedavgm_without_momentum_is_a_plain_step():
    x1, x2 = two_rounds(make_server_optimizer("fedavgm", server_learning_rate=2.0))
    close(x1, [1.8, -2.4, 2.0])
    close(x2, [2.2, -1.2, 2.1])


def test_fedadagrad_by_hand():
    x1, x2 = two_rounds(make_server_optimizer("fedadagrad", eta=0.1, tau=0.1))
    # round 1: m = d1; v = d1^2 = [0.16, 0.04, 1]; sqrt v = [0.4, 0.2, 1]
    w1 = [1 + 0.1 * 0.4 / 0.5, -2 + 0.1 * -0.2 / 0.3, 0 + 0.1 * 1.0 / 1.1]
    close(x1, w1)
    # round 2: m = d2; v = [0.2, 0.4, 1.0025]
    close(x2, [w1[0] + 0.1 * 0.2 / (math.sqrt(0.2) + 0.1), w1[1] + 0.1 * 0.6 / (math.sqrt(0.4) + 0.1),
               w1[2] + 0.1 * 0.05 / (math.sqrt(1.0025) + 0.1)])


def test_fedadam_by_hand():
    x1, x2 = two_rounds(make_server_optimizer("fedadam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=0.1))
    # round 1 (server round 1, Flower's exponent 1 + 1 = 2): m = 0.1 d1 = [0.04, -0.02, 0.1];
    # v = 0.01 d1^2 = [0.0016, 0.0004, 0.01]; sqrt v = [0.04, 0.02, 0.1]
    e1 = 0.1 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    w1 = [1 + e1 * 0.04 / 0.14, -2 + e1 * -0.02 / 0.12, 0 + e1 * 0.1 / 0.2]
    close(x1, w1)
    # round 2 (exponent 3): m = 0.9 m + 0.1 d2 = [0.056, 0.042, 0.095];
    # v = 0.99 v + 0.01 d2^2 = [0.001984, 0.003996, 0.009925]
    e2 = 0.1 * math.sqrt(1 - 0.99 ** 3) / (1 - 0.9 ** 3)
    close(x2, [w1[0] + e2 * 0.056 / (math.sqrt(0.001984) + 0.1), w1[1] + e2 * 0.042 / (math.sqrt(0.003996) + 0.1),
               w1[2] + e2 * 0.095 / (math.sqrt(0.009925) + 0.1)])


def test_fedyogi_by_hand():
    x1, x2 = two_rounds(make_server_optimizer("fedyogi", eta=0.1, beta_1=0.9, beta_2=0.99, tau=0.1))
    # round 1: v0 = 0 < d1^2, sign -1: v = 0 + 0.01 d1^2 = [0.0016, 0.0004, 0.01]; m = [0.04, -0.02, 0.1]
    w1 = [1 + 0.1 * 0.04 / 0.14, -2 + 0.1 * -0.02 / 0.12, 0 + 0.1 * 0.1 / 0.2]
    close(x1, w1)
    # round 2: d2^2 = [0.04, 0.36, 0.0025]; v - d2^2 < 0 for the first two (v grows by 0.01 d2^2),
    # > 0 for the third (v shrinks): v = [0.002, 0.004, 0.01 - 0.000025]; m = [0.056, 0.042, 0.095]
    close(x2, [w1[0] + 0.1 * 0.056 / (math.sqrt(0.002) + 0.1), w1[1] + 0.1 * 0.042 / (math.sqrt(0.004) + 0.1),
               w1[2] + 0.1 * 0.095 / (math.sqrt(0.009975) + 0.1)])


@pytest.mark.parametrize("name,params", [("fedavg", {"eta": 0.7}),
                                         ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
                                         ("fedadam", {"eta": 0.05}), ("fedyogi", {"eta": 0.05}),
                                         ("fedadagrad", {"eta": 0.05})])
def test_state_dict_round_trip_continues_identically(name, params):
    rng = np.random.default_rng(0)
    deltas = [{"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
              for _ in range(5)]
    a = make_server_optimizer(name, **params)
    x = {"w": np.zeros((4, 3), np.float32), "b": np.ones(3, np.float32)}
    for d in deltas[:2]:
        x = a.step(x, d)
    saved = pickle.loads(pickle.dumps(a.state_dict()))  # what a checkpoint does with it
    b = make_server_optimizer(name, **params)
    b.load_state_dict(saved)
    xa = xb = x
    for d in deltas[2:]:
        xa, xb = a.step(xa, d), b.step(xb, d)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k])
    assert b.round == 5


def test_state_dict_is_a_copy():
    opt = make_server_optimizer("fedadam")
    opt.step(X0, D1)
    sd = opt.state_dict()
    opt.step(X0, D2)
    np.testing.assert_allclose(sd["m_t"]["w"], 0.1 * D1["w"].astype(np.float64), rtol=1e-7)


def test_refusals():
    with pytest.raises(ValueError, match="unknown server optimizer"):
        make_server_optimizer("sgd")
    with pytest.raises(ValueError, match="unknown parameter"):
        make_server_optimizer("fedadam", server_momentum=0.9)
    with pytest.raises(ValueError, match="beta_1"):
        make_server_optimizer("fedyogi", beta_1=1.0)
    with pytest.raises(ValueError, match="tau"):
        make_server_optimizer("fedadagrad", tau=0.0)
    with pytest.raises(ValueError, match="keys"):
        make_server_optimizer("fedavg").step(X0, {"w": D1["w"]})
    with pytest.raises(ValueError, match="shape"):
        make_server_optimizer("fedavg").step(X0, {"w": D1["w"][:2], "b": D1["b"]})
    with pytest.raises(ValueError, match="cannot load"):
        make_server_optimizer("fedyogi").load_state_dict(make_server_optimizer("fedadam").state_dict())
    assert make_server_optimizer("FedAdam").name == "fedadam" and sorted(OPTIMIZERS) == [
        "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi"]


def test_defaults_match_flower():
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    for name, cls in (("fedadam", strategy.FedAdam), ("fedyogi", strategy.FedYogi),
                      ("fedadagrad", strategy.FedAdagrad)):
        ours, theirs = make_server_optimizer(name), cls()
        for k, v in ours.params.items():
            assert getattr(theirs, k) == pytest.approx(v), (name, k)
    theirs = strategy.FedAvgM()
    ours = make_server_optimizer("fedavgm")
    assert (theirs.server_learning_rate, theirs.server_momentum) == (ours.server_learning_rate,
                                                                     ours.server_momentum)


# --- against Flower's own aggregate_train -------------------------------------------------
def _reply(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # set by a ServerApp process
    ask = Message(RecordDict(), dst_node_id=1, message_type="train")
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": 1})}), reply_to=ask)


def _flower_two_rounds(strategy, fedopt: bool):
    """Drive a Flower strategy through two rounds whose single reply is x + d (mean = x + d)."""
    from flwr.app import Array, ArrayRecord

    x = {k: v.copy() for k, v in X0.items()}
    if not fedopt:  # what FedAvgM.configure_train records in the first round
        strategy.current_arrays = ArrayRecord({k: Array(v.copy()) for k, v in x.items()})
    out = []
    for r, d in ((1, D1), (2, D2)):
        if fedopt:  # what FedOpt.configure_train records
            strategy.current_arrays = {k: v.copy() for k, v in x.items()}
        rec, _ = strategy.aggregate_train(r, [_reply({k: x[k] + d[k] for k in x})])
        x = {k: a.numpy().astype(np.float32) for k, a in rec.items()}
        out.append(x)
    return out


@pytest.mark.parametrize("name,params", [
    ("fedadam", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.1}),
    ("fedyogi", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.1}),
    ("fedadagrad", {"eta": 0.1, "tau": 0.1}),
    ("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {}),
    ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
    ("fedavgm", {"server_learning_rate": 2.0})])
def test_agrees_with_flower_strategies(name, params):
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    cls = {"fedadam": strategy.FedAdam, "fedyogi": strategy.FedYogi, "fedadagrad": strategy.FedAdagrad,
           "fedavgm": strategy.FedAvgM}[name]
    theirs = _flower_two_rounds(cls(**params), fedopt=name != "fedavgm")
    ours = two_rounds(make_server_optimizer(name, **params))
    for a, b in zip(ours, theirs):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)
