"""Left padding, every-prefix training samples and evaluation rows."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.samples import EvalSet, eval_set, left_pad, train_samples


def arr(*items: int) -> np.ndarray:
    return np.array(items, dtype=np.int64)


def test_left_pad_pads_and_truncates() -> None:
    assert left_pad(arr(1, 2), 4).tolist() == [0, 0, 1, 2]
    assert left_pad(arr(1, 2, 3, 4, 5), 3).tolist() == [3, 4, 5]
    assert left_pad(arr(7, 8, 9), 3).tolist() == [7, 8, 9]
    empty = left_pad(arr(), 2)
    assert empty.tolist() == [0, 0] and empty.dtype == np.int64
    with pytest.raises(ValueError, match="max_len"):
        left_pad(arr(1), 0)


def test_train_samples_hand_example() -> None:
    histories, targets = train_samples([arr(1, 2, 3, 4, 5), arr(7, 8), arr(9)], 3)
    assert histories.tolist() == [
        [0, 0, 1],  # -> 2
        [0, 1, 2],  # -> 3
        [1, 2, 3],  # -> 4
        [2, 3, 4],  # -> 5, truncated to the last 3 items
        [0, 0, 7],  # -> 8, padding must not leak items of the previous sequence
    ]
    assert targets.tolist() == [2, 3, 4, 5, 8]  # the length-1 sequence gives no sample
    assert histories.dtype == np.int64 and targets.dtype == np.int64


def test_train_samples_empty() -> None:
    for seqs in ([], [arr(4)], [arr()]):
        histories, targets = train_samples(seqs, 5)
        assert histories.shape == (0, 5) and targets.shape == (0,)


def test_train_samples_matches_left_pad_on_random_data() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=n) for n in rng.integers(0, 12, size=30)]
    histories, targets = train_samples(seqs, 4)
    expected_h = [left_pad(s[:t], 4).tolist() for s in seqs for t in range(1, len(s))]
    expected_t = [int(s[t]) for s in seqs for t in range(1, len(s))]
    assert histories.tolist() == expected_h and targets.tolist() == expected_t


SEQUENCES = (arr(1, 2, 3, 4, 5), arr(6, 7, 8))


def test_eval_set_valid() -> None:
    ev = eval_set(SEQUENCES, np.array([1, 0]), "valid", 3)
    assert isinstance(ev, EvalSet)
    assert ev.histories.tolist() == [[0, 0, 6], [1, 2, 3]]
    assert ev.targets.tolist() == [7, 4]
    assert [s.tolist() for s in ev.seen] == [[6], [1, 2, 3]]
    assert ev.users.tolist() == [1, 0]


def test_eval_set_test_keeps_all_seen_items() -> None:
    ev = eval_set(SEQUENCES, np.array([0, 1]), "test", 3)
    assert ev.histories.tolist() == [[2, 3, 4], [0, 6, 7]]
    assert ev.targets.tolist() == [5, 8]
    # seen is the whole history, longer than the window of 3
    assert [s.tolist() for s in ev.seen] == [[1, 2, 3, 4], [6, 7]]
    assert ev.users.tolist() == [0, 1]


def test_eval_set_errors() -> None:
    with pytest.raises(ValueError, match="which"):
        eval_set(SEQUENCES, np.array([0]), "train", 3)
    with pytest.raises(ValueError, match="fewer than 3"):
        eval_set((arr(1, 2),), np.array([0]), "test", 3)
    empty = eval_set(SEQUENCES, np.zeros(0, dtype=np.int64), "test", 3)
    assert empty.histories.shape == (0, 3) and empty.targets.shape == (0,) and empty.seen == ()
