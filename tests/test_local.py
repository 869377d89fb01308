"""A client trains exactly its tier's steps; distillation weight 0 is plain training."""

import numpy as np
import pytest
import torch

from fedkd.budget import StepBudget
from fedkd.config import ExperimentConfig
from fedkd.edge import client_data
from fedkd.local import ProxyBatch, get_state, local_train, set_state
from fedkd.models import build_model


def _cfg(**kw):
    base = {"synthetic-users": 40, "synthetic-items": 60, "tier-names": "tiny,big",
            "tier-shares": "0.5,0.5", "tier-steps": "2,7"}
    return ExperimentConfig.from_flat({**base, **kw})


def _train(cfg, data, proxy, kd_weight, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg.student_model(data.num_items), seed=cfg.seed)
    budget = StepBudget(cfg.tiers[data.tier][2])
    res = local_train(model, data.train, proxy, budget=budget, batch_size=4, kd_batch_size=4, lr=0.01,
                      kd_weight=kd_weight, temperature=2.0, rng=np.random.default_rng(seed))
    return res, get_state(model)


def test_every_client_trains_exactly_its_tier_allowance():
    cfg = _cfg()
    steps_by_tier = {}
    for pid in range(10):
        data = client_data(cfg, pid)
        res, _ = _train(cfg, data, None, 0.0)
        steps_by_tier.setdefault(data.tier, set()).add(res.steps)
    assert steps_by_tier == {0: {2}, 1: {7}}


def test_kd_weight_zero_equals_training_without_proxy():
    cfg = _cfg()
    data = client_data(cfg, 0)
    rng = np.random.default_rng(1)
    proxy = ProxyBatch(histories=data.train[0][:8], ids=np.tile(np.arange(1, 6), (8, 1)),
                       probs=np.full((8, 5), 0.1, np.float32))
    _, plain = _train(cfg, data, None, 0.0)
    _, with_zero_kd = _train(cfg, data, proxy, 0.0)
    _, with_kd = _train(cfg, data, proxy, 1.0)
    for k in plain:
        assert np.array_equal(plain[k], with_zero_kd[k])
    assert any(not np.array_equal(plain[k], with_kd[k]) for k in plain)
    del rng


def test_set_state_get_state_round_trip():
    cfg = _cfg()
    m = build_model(cfg.student_model(10), seed=3)
    s = get_state(m)
    m2 = build_model(cfg.student_model(10), seed=4)
    set_state(m2, s)
    assert all(np.array_equal(s[k], v) for k, v in get_state(m2).items())
