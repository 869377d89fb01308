"""Fleet ensembles and server-side distillation (logit-only FD, teacher refinement, proxy-only)."""

import numpy as np
import pytest
import torch

from fedkd.distill import SoftLabels, kd_loss
from fedkd.fleet import average, densify, distill, ensemble_of_states, predict_dense, top_k
from fedkd.local import ProxyBatch, get_state
from fedkd.models import ModelConfig, build_model

N = 30


def _model(seed):
    return build_model(ModelConfig(kind="sasrec", num_items=N, dim=8, blocks=1, heads=1, max_len=6,
                                   dropout=0.0), seed=seed)


def _hist(rows=5, seed=0):
    return np.random.default_rng(seed).integers(1, N + 1, size=(rows, 6)).astype(np.int64)


def test_densify_keeps_top_k_and_spreads_the_rest_evenly():
    sl = SoftLabels(ids=np.array([[3, 7]]), probs=np.array([[0.5, 0.2]], np.float32))
    d = densify(sl, N)
    assert d.shape == (1, N + 1) and d[0, 0] == 0
    assert d.sum() == pytest.approx(1.0)
    assert d[0, 3] == pytest.approx(0.5) and d[0, 7] == pytest.approx(0.2)
    others = np.delete(d[0, 1:], [2, 6])
    assert np.allclose(others, 0.3 / (N - 2))


def test_top_k_of_densified_labels_gives_the_labels_back():
    dense = predict_dense(_model(0), _hist(), temperature=2.0)
    sl = top_k(dense, 5)
    back = top_k(densify(sl, N), 5)
    assert np.array_equal(back.ids, sl.ids)
    assert np.allclose(back.probs, sl.probs, atol=1e-6)
    assert np.all(np.diff(sl.probs, axis=1) <= 0)  # descending


def test_average_is_the_weighted_mean_and_rejects_nothing_to_average():
    a, b = np.full((2, 4), 0.25), np.array([[0, 1, 0, 0]] * 2, float)
    assert np.allclose(average([a, b], [3, 1]), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError):
        average([])


def test_ensemble_of_states_is_the_mean_of_each_models_prediction():
    model, hist = _model(0), _hist()
    states = [get_state(_model(s)) for s in (1, 2, 3)]
    expected = np.mean([predict_dense(_model(s), hist, temperature=2.0) for s in (1, 2, 3)], axis=0)
    assert np.allclose(ensemble_of_states(model, states, hist, temperature=2.0), expected)


@pytest.mark.parametrize("private", [False, True])
def test_distill_moves_the_model_towards_the_targets(private):
    teacher, student, hist = _model(1), _model(2), _hist(16)
    sl = top_k(predict_dense(teacher, hist, temperature=2.0), 5)
    proxy = ProxyBatch(hist, sl.ids, sl.probs)

    def gap():
        with torch.no_grad():
            return float(kd_loss(student(torch.from_numpy(hist)), torch.from_numpy(sl.ids),
                                 torch.from_numpy(sl.probs), temperature=2.0))

    before = gap()
    priv = (_hist(16, seed=1), np.arange(1, 17, dtype=np.int64)) if private else None
    loss = distill(student, torch.optim.Adam(student.parameters(), lr=1e-2), proxy, steps=40, kd_batch_size=8,
                   temperature=2.0, rng=np.random.default_rng(0), private=priv, batch_size=8)
    assert np.isfinite(loss)
    assert gap() < 0.7 * before
