"""The screening loop's distillation schedules, the centralized recipe's new TrainConfig options
(defaults unchanged, teacher cache keys unchanged), and a two-round smoke run on synthetic data."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields

import pytest

import fedkd.teacher as teacher
from fedkd.models import ModelConfig
from fedkd.train import TrainConfig, lr_factor
from simulations.screen import kd_weight_at, main as screen_main


def test_kd_schedules():
    kw = dict(decay_rounds=10, decay=0.5, gated=False)
    assert [kd_weight_at(2.0, "constant", r, **kw) for r in (1, 50)] == [2.0, 2.0]
    assert [kd_weight_at(2.0, "linear", r, **kw) for r in (1, 6, 11, 30)] == [2.0, 1.0, 0.0, 0.0]
    assert [kd_weight_at(2.0, "exp", r, **kw) for r in (1, 2, 3)] == [2.0, 1.0, 0.5]
    assert kd_weight_at(2.0, "gate", 5, **kw) == 2.0
    assert kd_weight_at(2.0, "gate", 5, **{**kw, "gated": True}) == 0.0
    assert kd_weight_at(0.0, "constant", 1, **kw) == 0.0


def test_lr_factor():
    const = TrainConfig(epochs=4)
    assert [lr_factor(const, s, 10) for s in (0, 39)] == [1.0, 1.0]
    cos = TrainConfig(epochs=4, lr_schedule="cosine")
    assert lr_factor(cos, 0, 10) == 1.0
    assert lr_factor(cos, 20, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 40, 10) == pytest.approx(0.0)
    warm = TrainConfig(epochs=4, warmup_epochs=1)
    assert [lr_factor(warm, s, 10) for s in (0, 4, 9, 10)] == [0.1, 0.5, 1.0, 1.0]
    warm_cos = TrainConfig(epochs=3, warmup_epochs=1, lr_schedule="cosine")
    assert lr_factor(warm_cos, 20, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError):
        TrainConfig(lr_schedule="step")


def test_new_train_options_leave_teacher_cache_keys_alone():
    """The key of a default TrainConfig is the key computed before the options existed."""
    model, train = ModelConfig(num_items=10), TrainConfig()
    old = {k: v for k, v in asdict(train).items() if k not in ("lr_schedule", "warmup_epochs", "min_epochs", "amp",
                                                                 "val_smoothing")}
    payload = {"version": teacher.CACHE_VERSION, "model": asdict(model), "train": old, "data": "abc", "extra": {}}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    assert teacher.teacher_cache_key(model, train, "abc") == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert teacher.teacher_cache_key(model, TrainConfig(lr_schedule="cosine"), "abc") != \
        teacher.teacher_cache_key(model, train, "abc")
    assert {f.name for f in fields(TrainConfig)} >= set(teacher._LATER_FIELDS)


@pytest.mark.slow
def test_screen_smoke(tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text('synthetic-users = 60\nsynthetic-items = 50\nmax-len = 10\nteacher-dim = 8\n'
                   'teacher-epochs = 2\nproxy-size = 64\nproxy-batch = 16\ntier-steps = "1,2"\n')
    screen_main(["--data-path", "", "--config", str(cfg), "--rounds", "2", "--clients-per-round", "5",
                 "--server-opt", "fedadam", "--server-param", "eta=0.01", "--eval-every", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path), "--tag", "smoke"])
    line = json.loads((tmp_path / "screen.jsonl").read_text().splitlines()[-1])
    assert line["rounds_run"] == 2 and line["server_opt"] == "fedadam" and 0 <= line["test_ndcg10"] <= 1
    assert (tmp_path / "smoke.csv").read_text().count("\n") == 3
