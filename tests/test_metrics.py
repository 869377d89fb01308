"""Hand-computed checks of full-ranking HR/NDCG with history masking."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedkd.metrics import evaluate_ranking, hit_ndcg, score_ranking, target_ranks
from fedkd.popularity import popularity_scorer, popularity_scores


@dataclass(frozen=True)
class Ev:  # the fields of fedkd.samples.EvalSet that ranking reads
    histories: np.ndarray
    targets: np.ndarray
    seen: tuple[np.ndarray, ...]
    users: np.ndarray


# N = 5 items; column 0 is padding and gets the highest raw score on purpose.
SCORES = torch.tensor([
    [9.0, 0.5, 0.9, 0.1, 0.7, 0.3],  # target 3; seen {1, 3, 4}: 1 and 4 masked, 3 stays -> above it: 2, 5
    [100., 0.2, 0.2, 0.5, 0.1, 0.2],  # target 2; nothing seen -> above it: 3; ties 1, 5 optimistic
    [0.0, 0.4, 0.3, 0.2, 0.1, 0.0],  # target 5 (lowest); seen {2, 2, 5, 5} (repeats) -> above it: 1, 3, 4
    [0.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 1 (best) -> rank 0
])
TARGETS = np.array([3, 2, 5, 1])
SEEN = (np.array([1, 3, 4]), np.array([], dtype=np.int64), np.array([2, 2, 5, 5]), np.array([5]))
RANKS = np.array([2, 1, 3, 0])


def test_target_ranks_masks_history_but_not_target_and_never_counts_padding():
    ranks = target_ranks(SCORES, torch.from_numpy(TARGETS), SEEN)
    np.testing.assert_array_equal(ranks, RANKS)
    assert ranks.dtype == np.int64


def test_target_ranks_does_not_modify_scores():
    scores = SCORES.clone()
    target_ranks(scores, torch.from_numpy(TARGETS), SEEN)
    assert torch.equal(scores, SCORES)


def test_target_ranks_rejects_mismatched_seen():
    with pytest.raises(ValueError):
        target_ranks(SCORES, torch.from_numpy(TARGETS), SEEN[:2])


def test_hit_ndcg_exact_values():
    hr, ndcg = hit_ndcg(np.array([0, 2, 9, 10, 50]), k=10)
    np.testing.assert_array_equal(hr, [1, 1, 1, 0, 0])
    np.testing.assert_allclose(ndcg, [1.0, 0.5, 1 / math.log2(11), 0.0, 0.0])
    hr5, _ = hit_ndcg(np.array([4, 5]), k=5)
    np.testing.assert_array_equal(hr5, [1, 0])


def test_score_ranking_batches_agree_and_keep_users():
    ev = Ev(np.zeros((4, 3), np.int64), TARGETS, SEEN, np.array([7, 8, 9, 10]))
    calls = []

    def fn(h: np.ndarray) -> torch.Tensor:  # rows arrive in order; serve the matching score rows
        start = sum(calls)
        calls.append(len(h))
        return SCORES[start:start + len(h)]

    res = score_ranking(fn, ev, k=2, batch_size=3)
    assert calls == [3, 1]
    np.testing.assert_array_equal(res.per_user_hr, [0, 1, 0, 1])
    np.testing.assert_allclose(res.per_user_ndcg, [0, 1 / math.log2(3), 0, 1])
    assert res.n == 4 and res.hr == 0.5
    assert res.ndcg == pytest.approx((1 / math.log2(3) + 1) / 4)
    np.testing.assert_array_equal(res.users, [7, 8, 9, 10])


def test_evaluate_ranking_uses_eval_mode_and_restores_train_mode():
    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.modes: list[bool] = []

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            self.modes.append(self.training)
            assert not torch.is_grad_enabled()
            return SCORES[: len(h)] + self.w

    m = Fixed().train()
    res = evaluate_ranking(m, Ev(np.zeros((4, 3), np.int64), TARGETS, SEEN, np.arange(4)), k=10)
    assert m.modes == [False] and m.training
    assert res.hr == 1.0


def test_popularity_counts_and_padding_column():
    scores = popularity_scores([np.array([1, 2, 2]), np.array([2, 3])], num_items=4)
    np.testing.assert_array_equal(scores[1:].numpy(), [1, 3, 1, 0])
    assert scores[0] < -1e30 and torch.isfinite(scores[0])
    fn = popularity_scorer([np.array([1, 2, 2]), np.array([2, 3])], num_items=4)
    out = fn(np.zeros((3, 5), np.int64))
    assert out.shape == (3, 5) and torch.equal(out[2], scores)
    # user saw 2, so the favourite is masked; target 3 ties item 1 and wins by the optimistic rule
    ev = Ev(np.zeros((1, 5), np.int64), np.array([3]), (np.array([2]),), np.array([0]))
    assert score_ranking(fn, ev, k=1).hr == 1.0
