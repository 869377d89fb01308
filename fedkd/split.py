"""Evaluation split and the cloud / edge population layout.

The random draws use named streams of :mod:`fedkd.streams`
per purpose, so that changing how many clients there are never changes which
users live in the cloud, and every process derives the same layout from the
experiment seed alone.
"""

from __future__ import annotations

import math

import numpy as np

from fedkd import streams
from fedkd.streams import Stream

__all__ = ["leave_one_out", "partition_clients", "split_population"]


def leave_one_out(seq: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Hold out the last two items, the standard next-item protocol.

    Parameters
    ----------
    seq
        (T,) one user's chronological items, ``T >= 3``.

    Returns
    -------
    tuple
        ``(train, valid_target, test_target)`` = ``(seq[:-2], seq[-2],
        seq[-1])``.  ``train`` is a view, so it stays read-only when
        ``seq`` comes from a :class:`fedkd.data.Dataset`.

    Raises
    ------
    ValueError
        Fewer than three items (nothing would be left to train on) or not 1-D.
    """
    array = np.asarray(seq)
    if array.ndim != 1:
        raise ValueError(f"seq must be 1-D, got shape {array.shape}")
    if len(array) < 3:
        raise ValueError(f"leave-one-out needs at least 3 items, got {len(array)}")
    return array[:-2], int(array[-2]), int(array[-1])


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def split_population(num_users: int, cloud_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose the users whose data the cloud model may see directly.

    Parameters
    ----------
    num_users
        Users are the internal indices ``0..num_users-1``.
    cloud_fraction
        In ``[0, 1)``; ``round(cloud_fraction * num_users)`` users (Python
        rounding) go to the cloud.  1 is excluded because the simulation
        needs edge users.
    seed
        Experiment seed; the draw uses ``Stream.CLOUD_USERS`` (fedkd.streams).

    Returns
    -------
    tuple
        ``(cloud_users, edge_users)``, sorted int64 arrays, disjoint, whose
        union is every user.

    Raises
    ------
    ValueError
        Bad arguments, or a fraction so close to 1 that rounding leaves no
        edge user.
    """
    if isinstance(num_users, bool) or not isinstance(num_users, (int, np.integer)) or num_users < 0:
        raise ValueError(f"num_users must be a non-negative int, got {num_users!r}")
    if (
        isinstance(cloud_fraction, bool)
        or not isinstance(cloud_fraction, (int, float, np.integer, np.floating))
        or not math.isfinite(cloud_fraction)
        or not 0 <= cloud_fraction < 1
    ):
        raise ValueError(f"cloud_fraction must be in [0, 1), got {cloud_fraction!r}")
    _check_seed(seed)
    num_cloud = round(float(cloud_fraction) * int(num_users))
    if num_users > 0 and num_cloud >= num_users:
        raise ValueError(
            f"cloud-fraction {cloud_fraction} puts all {num_users} users in the cloud; "
            "at least one edge user is needed: lower --cloud-fraction or add users"
        )
    permutation = streams.rng(seed, Stream.CLOUD_USERS).permutation(int(num_users))
    cloud = np.sort(permutation[:num_cloud]).astype(np.int64)  # (num_cloud,)
    edge = np.sort(permutation[num_cloud:]).astype(np.int64)  # (num_users - num_cloud,)
    return cloud, edge


def partition_clients(edge_users: np.ndarray, users_per_client: int, seed: int) -> list[np.ndarray]:
    """Group edge users into simulated devices of equal size.

    Parameters
    ----------
    edge_users
        (E,) distinct internal user indices.  They are sorted before
        shuffling, so the result depends only on the set, not its order.
    users_per_client
        Users per client, ``>= 1``; the last client gets the remainder.
    seed
        Experiment seed; the shuffle uses ``Stream.CLIENT_USERS``.

    Returns
    -------
    list of numpy.ndarray
        ``ceil(E / users_per_client)`` sorted int64 arrays that together hold
        every edge user exactly once; empty list for no edge users.

    Raises
    ------
    ValueError
        ``users_per_client < 1``, a bad seed, or duplicate / non-1-D users.
    """
    if (
        isinstance(users_per_client, bool)
        or not isinstance(users_per_client, (int, np.integer))
        or users_per_client < 1
    ):
        raise ValueError(f"users_per_client must be an int >= 1, got {users_per_client!r}")
    _check_seed(seed)
    users = np.sort(np.asarray(edge_users, dtype=np.int64))  # (E,)
    if users.ndim != 1:
        raise ValueError(f"edge_users must be 1-D, got shape {users.shape}")
    if len(users) > 1 and (np.diff(users) == 0).any():
        raise ValueError("edge_users contains duplicates")
    shuffled = streams.rng(seed, Stream.CLIENT_USERS).permutation(users)  # (E,)
    size = int(users_per_client)
    return [np.sort(shuffled[i : i + size]) for i in range(0, len(shuffled), size)]
