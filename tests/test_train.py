"""Central training, the shared train_step, early stopping and the teacher cache."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedkd.teacher as teacher
from fedkd.metrics import evaluate_ranking, score_ranking
from fedkd.models import ModelConfig, build_model
from fedkd.popularity import popularity_scorer
from fedkd.train import TrainConfig, train_central, train_step

torch.set_num_threads(2)

N, L = 40, 8


@dataclass(frozen=True)
class Ev:  # the fields of fedkd.samples.EvalSet that ranking reads
    histories: np.ndarray
    targets: np.ndarray
    seen: tuple[np.ndarray, ...]
    users: np.ndarray


def left_pad(seq: np.ndarray) -> np.ndarray:
    out = np.zeros(L, np.int64)
    tail = seq[-L:]
    out[L - len(tail):] = tail
    return out


def successor_task(users: int = 160, length: int = 7, seed: int = 0):
    """Item i is always followed by i + 1 (mod N): a perfect model has HR@10 = 1, while
    popularity over uniform starts is near chance. Leave-one-out: last item test, one before valid."""
    starts = np.random.default_rng(seed).integers(0, N, users)
    seqs = [(s + np.arange(length)) % N + 1 for s in starts]
    hists, targets = [], []
    for seq in seqs:
        for t in range(1, length - 2):  # training prefix seq[:-2]
            hists.append(left_pad(seq[:t]))
            targets.append(seq[t])
    train = (np.stack(hists), np.array(targets))
    valid = Ev(np.stack([left_pad(s[:-2]) for s in seqs]), np.array([s[-2] for s in seqs]),
               tuple(s[:-2] for s in seqs), np.arange(users))
    test = Ev(np.stack([left_pad(s[:-1]) for s in seqs]), np.array([s[-1] for s in seqs]),
              tuple(s[:-1] for s in seqs), np.arange(users))
    return [s[:-2] for s in seqs], train, valid, test


TASK = successor_task()
MODEL = ModelConfig(kind="sasrec", num_items=N, dim=16, blocks=1, heads=1, max_len=L, dropout=0.1)
FAST = TrainConfig(epochs=3, batch_size=64, lr=1e-2, patience=3, seed=0)


def test_sasrec_learns_successor_task_and_beats_popularity():
    train_seqs, train, valid, test = TASK
    model = build_model(MODEL, seed=0)
    res = train_central(model, train, valid, TrainConfig(epochs=30, batch_size=64, lr=1e-2, patience=2))
    got = evaluate_ranking(model, test)
    pop = score_ranking(popularity_scorer(train_seqs, N), test)
    assert got.hr >= 0.95 and got.ndcg >= 0.8, (got.hr, got.ndcg, res.history[-1])
    assert pop.hr < 0.5 and got.ndcg > pop.ndcg + 0.5
    # the model holds the best-by-validation weights, which are result.state
    assert all(torch.equal(model.state_dict()[k], v) for k, v in res.state.items())
    assert evaluate_ranking(model, valid).ndcg == pytest.approx(res.best_valid_ndcg)
    assert res.best_valid_ndcg == max(h["valid_ndcg"] for h in res.history)


def test_train_step_returns_pre_update_cross_entropy():
    _, (hist, target), _, _ = TASK
    model = build_model(replace(MODEL, dropout=0.0), seed=1)
    h, t = torch.from_numpy(hist[:32]), torch.from_numpy(target[:32])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(h), t).item()
    before = model.state_dict()["item_emb.weight"].clone()
    loss = train_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), h, t)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert not torch.equal(before, model.state_dict()["item_emb.weight"])


def _one_step(kd, kd_weight: float, temperature: float = 2.0):
    _, (hist, target), _, _ = TASK
    model = build_model(MODEL, seed=1)
    torch.manual_seed(5)  # dropout draws
    loss = train_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), torch.from_numpy(hist[:32]),
                      torch.from_numpy(target[:32]), kd=kd, kd_weight=kd_weight, temperature=temperature)
    return loss, model.state_dict()


def _kd_batch():
    _, (hist, _), _, _ = TASK
    probs = torch.tensor([[0.5, 0.2, 0.1]]).repeat(8, 1)
    ids = torch.tensor([[3, 7, 11]]).repeat(8, 1)
    return torch.from_numpy(hist[-8:]), ids, probs


def test_train_step_kd_weight_zero_is_exactly_plain_training():
    loss_a, a = _one_step(None, 0.0)
    loss_b, b = _one_step(_kd_batch(), 0.0)
    assert loss_a == loss_b
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(importlib.util.find_spec("fedkd.distill") is None, reason="fedkd.distill not written yet")
def test_train_step_kd_adds_weighted_scaled_term():
    from fedkd.distill import kd_loss

    loss_a, a = _one_step(None, 0.0)
    loss_b, b = _one_step(_kd_batch(), 0.5, temperature=2.0)
    assert not torch.equal(a["item_emb.weight"], b["item_emb.weight"])
    # the KD forward runs after the CE forward, so CE saw the same dropout draw as loss_a
    model = build_model(MODEL, seed=1)
    torch.manual_seed(5)
    model.train()(torch.from_numpy(TASK[1][0][:32]))  # replay the CE forward's dropout draws
    kd_hist, ids, probs = _kd_batch()
    with torch.no_grad():
        kd = kd_loss(model(kd_hist), ids, probs, temperature=2.0).item()
    assert loss_b == pytest.approx(loss_a + 0.5 * 4.0 * kd, rel=1e-5)


def test_early_stopping_after_patience_non_improving_epochs():
    _, train, valid, _ = TASK
    model = build_model(MODEL, seed=0)
    seen: list[dict] = []
    res = train_central(model, train, valid, replace(FAST, epochs=20, lr=0.0, patience=2), progress=seen.append)
    # lr = 0: validation never improves after epoch 1, so epochs 2 and 3 use up the patience
    assert res.epochs_run == 3 and res.best_epoch == 1
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and seen == res.history
    assert set(res.history[0]) >= {"epoch", "loss", "valid_hr", "valid_ndcg", "seconds"}


@pytest.mark.parametrize("smoothing, best_epoch, best", [(1, 2, 0.5), (2, 5, 0.35)])
def test_validation_smoothing_keeps_a_single_lucky_epoch_from_choosing(monkeypatch, smoothing, best_epoch, best):
    """Scripted validation NDCG per epoch with one spike (epoch 2): unsmoothed, the spike is
    chosen; on the mean of the last 2 validations, epoch 5 (the best window's newest model)."""
    import fedkd.train as train_mod

    script = iter([0.1, 0.5, 0.1, 0.35, 0.35, 0.1])
    monkeypatch.setattr(train_mod, "evaluate_ranking", lambda *a, **k: SimpleNamespace(hr=0.0, ndcg=next(script)))
    _, train, valid, _ = TASK
    res = train_central(build_model(MODEL, seed=0), train, valid,
                        replace(FAST, epochs=6, patience=10, val_smoothing=smoothing))
    assert (res.best_epoch, res.epochs_run) == (best_epoch, 6)
    assert res.best_valid_ndcg == pytest.approx(best)


def test_max_seconds_stops_after_the_epoch_in_progress():
    _, train, valid, _ = TASK
    res = train_central(build_model(MODEL), train, valid, replace(FAST, epochs=10, max_seconds=0.0))
    assert res.epochs_run == 1


def test_train_central_is_seeded_and_leaves_global_rng_alone():
    _, train, valid, _ = TASK
    torch.manual_seed(9)
    expected = torch.rand(2)
    torch.manual_seed(9)
    a = train_central(build_model(MODEL, seed=0), train, valid, replace(FAST, epochs=2))
    assert torch.equal(torch.rand(2), expected)
    b = train_central(build_model(MODEL, seed=0), train, valid, replace(FAST, epochs=2))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.history[-1]["loss"] == b.history[-1]["loss"]


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(patience=0), dict(batch_size=0), dict(lr=-1.0),
                                 dict(max_seconds=-1.0)])
def test_train_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_cache_key_is_stable_and_sensitive():
    key = teacher.teacher_cache_key(MODEL, FAST, "abc", {"a": 1, "b": "x"})
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == teacher.teacher_cache_key(MODEL, FAST, "abc", {"b": "x", "a": 1})
    assert key != teacher.teacher_cache_key(MODEL, FAST, "abd", {"a": 1, "b": "x"})
    assert key != teacher.teacher_cache_key(replace(MODEL, dim=8), FAST, "abc", {"a": 1, "b": "x"})
    assert key != teacher.teacher_cache_key(MODEL, replace(FAST, seed=1), "abc", {"a": 1, "b": "x"})
    assert teacher.teacher_cache_key(MODEL, FAST, "abc") == teacher.teacher_cache_key(MODEL, FAST, "abc", {})


def test_teacher_cache_hit_does_not_train(tmp_path, monkeypatch):
    _, train, valid, _ = TASK
    m1, info1 = teacher.load_or_train(MODEL, FAST, "fp", train, valid, cache_dir=tmp_path)
    assert info1["cached"] is False and info1["epochs_run"] >= 1
    path = tmp_path / f"teacher-{info1['key']}.pt"
    assert info1["path"] == str(path) and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind

    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(teacher, "train_central", boom)
    m2, info2 = teacher.load_or_train(MODEL, FAST, "fp", train, valid, cache_dir=tmp_path)
    assert info2["cached"] is True and info2["key"] == info1["key"]
    assert info2["best_epoch"] == info1["best_epoch"] and info2["best_valid_ndcg"] == info1["best_valid_ndcg"]
    assert all(torch.equal(m1.state_dict()[k], v) for k, v in m2.state_dict().items())
    assert evaluate_ranking(m2, valid).ndcg == pytest.approx(info1["best_valid_ndcg"])


def test_corrupt_teacher_cache_is_retrained(tmp_path):
    _, train, valid, _ = TASK
    key = teacher.teacher_cache_key(MODEL, FAST, "fp")
    path = tmp_path / f"teacher-{key}.pt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.warns(RuntimeWarning, match="unreadable teacher cache"):
        _, info = teacher.load_or_train(MODEL, FAST, "fp", train, valid, cache_dir=tmp_path)
    assert info["cached"] is False
    _, again = teacher.load_or_train(MODEL, FAST, "fp", train, valid, cache_dir=tmp_path)  # rewritten, readable
    assert again["cached"] is True


def test_amp_on_a_cpu_warns_and_trains_exactly_as_fp32(caplog):
    """Mixed precision is GPU-only: on a CPU it says so and changes nothing, bit for bit."""
    _, train, valid, _ = TASK
    a = train_central(build_model(MODEL, seed=0), train, valid, replace(FAST, epochs=1))
    with caplog.at_level("WARNING", logger="fedkd"):
        b = train_central(build_model(MODEL, seed=0), train, valid, replace(FAST, epochs=1, amp=True))
    assert any("needs a CUDA GPU" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_amp_default_leaves_cached_teachers_valid():
    """A teacher cached before `amp` existed keeps its key; one trained with amp gets another."""
    base = teacher.teacher_cache_key(MODEL, FAST, "abc")
    assert "amp" not in teacher._train_key(FAST)
    assert base != teacher.teacher_cache_key(MODEL, replace(FAST, amp=True), "abc")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is exercised on a CUDA GPU only")
def test_amp_on_a_gpu_trains_to_a_comparable_model():
    _, train, valid, test = TASK
    res = {}
    for amp in (False, True):
        model = build_model(MODEL, seed=0).cuda()
        train_central(model, train, valid, replace(FAST, epochs=10, amp=amp))
        res[amp] = evaluate_ranking(model, test, k=10).hr
    assert res[True] >= res[False] - 0.1, res
