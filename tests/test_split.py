"""Leave-one-out, cloud/edge split and client partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.split import leave_one_out, partition_clients, split_population


def test_leave_one_out_hand_example() -> None:
    train, valid, test = leave_one_out(np.array([5, 9, 2, 7, 4], dtype=np.int64))
    assert train.tolist() == [5, 9, 2]
    assert (valid, test) == (7, 4)
    assert isinstance(valid, int) and isinstance(test, int)


def test_leave_one_out_minimum_length() -> None:
    train, valid, test = leave_one_out(np.array([1, 2, 3]))
    assert (train.tolist(), valid, test) == ([1], 2, 3)
    with pytest.raises(ValueError, match="at least 3"):
        leave_one_out(np.array([1, 2]))


def test_split_population_sizes_disjoint_and_covering() -> None:
    cloud, edge = split_population(10, 0.3, seed=0)
    assert len(cloud) == 3 and len(edge) == 7
    assert cloud.dtype == np.int64 and edge.dtype == np.int64
    assert np.all(np.diff(cloud) > 0) and np.all(np.diff(edge) > 0)  # sorted, no repeats
    assert np.intersect1d(cloud, edge).size == 0
    assert np.union1d(cloud, edge).tolist() == list(range(10))


def test_split_population_uses_the_documented_stream() -> None:
    expected = np.sort(np.random.default_rng([7, 1]).permutation(20)[:5])
    cloud, _ = split_population(20, 0.25, seed=7)
    assert cloud.tolist() == expected.tolist()


def test_split_population_rounding() -> None:
    # round() is Python's: 2.5 -> 2, 3.5 -> 4
    assert len(split_population(10, 0.25, seed=0)[0]) == 2
    assert len(split_population(10, 0.35, seed=0)[0]) == 4
    assert len(split_population(10, 0.04, seed=0)[0]) == 0


def test_split_population_determinism() -> None:
    first = split_population(100, 0.2, seed=1)
    again = split_population(100, 0.2, seed=1)
    other = split_population(100, 0.2, seed=2)
    assert first[0].tolist() == again[0].tolist() and first[1].tolist() == again[1].tolist()
    assert first[0].tolist() != other[0].tolist()


def test_split_population_zero_fraction() -> None:
    cloud, edge = split_population(4, 0.0, seed=0)
    assert cloud.tolist() == [] and cloud.dtype == np.int64
    assert edge.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan"), 0.99])
def test_split_population_rejects_bad_fraction(fraction: float) -> None:
    # 0.99 of 10 rounds to 10 cloud users and would leave no edge user
    with pytest.raises(ValueError, match="cloud"):
        split_population(10, fraction, seed=0)


def test_partition_sizes_and_cover() -> None:
    edge = np.array([2, 3, 5, 8, 9, 11, 12, 14, 15, 20], dtype=np.int64)
    clients = partition_clients(edge, 3, seed=0)
    assert [len(c) for c in clients] == [3, 3, 3, 1]
    assert all(np.all(np.diff(c) > 0) for c in clients)
    assert all(c.dtype == np.int64 for c in clients)
    assert np.sort(np.concatenate(clients)).tolist() == edge.tolist()  # each exactly once


def test_partition_uses_the_documented_stream() -> None:
    edge = np.arange(10, 17, dtype=np.int64)
    shuffled = np.random.default_rng([4, 2]).permutation(edge)
    expected = [sorted(shuffled[:3].tolist()), sorted(shuffled[3:6].tolist()), shuffled[6:].tolist()]
    assert [c.tolist() for c in partition_clients(edge, 3, seed=4)] == expected


def test_partition_determinism_and_order_invariance() -> None:
    edge = np.arange(40, dtype=np.int64)
    first = [c.tolist() for c in partition_clients(edge, 4, seed=3)]
    assert first == [c.tolist() for c in partition_clients(edge, 4, seed=3)]
    assert first == [c.tolist() for c in partition_clients(edge[::-1].copy(), 4, seed=3)]
    assert first != [c.tolist() for c in partition_clients(edge, 4, seed=5)]


def test_partition_edge_cases() -> None:
    assert partition_clients(np.zeros(0, dtype=np.int64), 2, seed=0) == []
    assert [c.tolist() for c in partition_clients(np.array([4, 1]), 1, seed=0)] in ([[1], [4]], [[4], [1]])
    with pytest.raises(ValueError, match="users_per_client"):
        partition_clients(np.array([1, 2]), 0, seed=0)
    with pytest.raises(ValueError, match="duplicates"):
        partition_clients(np.array([1, 1, 2]), 1, seed=0)
