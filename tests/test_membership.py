"""Membership inference: the rank AUC by hand, and the attack on models that do / do not memorise."""

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.membership import attack_samples, membership_attack, rank_auc


def test_rank_auc_by_hand():
    assert rank_auc([3, 4], [1, 2]) == 1.0
    assert rank_auc([1, 2], [3, 4]) == 0.0
    assert rank_auc([1, 1], [1, 1]) == 0.5
    assert rank_auc([2, 0], [1]) == 0.5  # one pair won, one lost
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40).round(1), rng.normal(size=30).round(1)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert rank_auc(a, b) == pytest.approx(brute)


class _Lookup(nn.Module):
    """Scores items by a fixed table per last history item: a model whose memory we control."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.table[h[:, -1]]


def _seqs(n_users=60, n_items=30, length=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, size=length) for _ in range(n_users)], n_items


def test_a_model_that_memorised_the_members_is_caught_and_a_blank_one_is_not():
    seqs, n = _seqs()
    users = list(range(len(seqs)))
    memorised = torch.zeros(n + 1, n + 1)
    for s in seqs:  # it learned "after s[-4] comes s[-3]", the member interaction
        memorised[s[-4], s[-3]] += 5.0
    res = membership_attack(_Lookup(memorised), seqs, users, max_len=5)
    assert res["auc_loss"] > 0.9 and res["auc_rank"] > 0.85 and res["members"] == 60  # ranks tie more
    blank = membership_attack(_Lookup(torch.zeros(n + 1, n + 1)), seqs, users, max_len=5)
    assert blank["auc_loss"] == 0.5


def test_members_and_non_members_are_adjacent_positions_of_each_history():
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9])]
    mh, mt, nh, nt = attack_samples(seqs, [0, 1], max_len=4)
    assert mt.tolist() == [4] and nt.tolist() == [6]  # the 3-item user has no member history
    assert mh.tolist() == [[0, 1, 2, 3]] and nh.tolist() == [[2, 3, 4, 5]]
