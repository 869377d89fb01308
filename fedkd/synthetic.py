"""Seeded synthetic interaction logs with real sequential structure.

Tests and smoke runs need data that (a) needs no download, (b) is small and
fast, and (c) rewards a sequence model over popularity, otherwise a broken
model and a working one look alike.  The generator therefore walks each user
along a cluster-specific chain of items: the next item is usually a short
step ahead of the previous one in its cluster's ordering, so it is
predictable from recent items but not from global counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedkd import streams
from fedkd.streams import Stream

__all__ = ["generate_synthetic"]

_P_STEP = 0.75  # continue along the chain from the previous item
_P_CLUSTER_JUMP = 0.15  # restart at a popular item of the user's own cluster
# the rest (0.10): a globally popular item as noise; the chain position stays put
_STEP_P = 0.6  # chain steps are geometric: 1 w.p. 0.6, 2 w.p. 0.24, ...
_ZIPF_EXPONENT = 1.0
_LENGTH_SIGMA = 0.5  # log-normal spread of sequence lengths
_MIN_LENGTH = 5
_BASE_TIME = 1_000_000_000  # seconds; keeps timestamps realistic-looking
_MEAN_GAP = 3_600  # seconds between a user's consecutive interactions


def generate_synthetic(
    *,
    num_users: int = 300,
    num_items: int = 400,
    mean_length: int = 40,
    num_clusters: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """Generate an implicit-feedback log shaped like :func:`fedkd.data.load_interactions` output.

    Parameters
    ----------
    num_users, num_items
        User ids are ``1..num_users``, item ids ``1..num_items`` (an item may
        never be drawn, so the built dataset can have fewer items).
    mean_length
        Mean sequence length; lengths are log-normal around it so clients see
        uneven amounts of data, with a floor of 5 so every user survives
        leave-one-out with history to spare.
    num_clusters
        Items are split into this many taste clusters and each user belongs
        to one, which gives users distinct but overlapping behaviour.
    seed
        Same seed, same frame; different seeds give different frames.

    Returns
    -------
    pandas.DataFrame
        int64 columns ``user``, ``item``, ``timestamp``; rows sorted by time
        like a real log.  Each user's timestamps strictly increase, so the
        chronological order is unambiguous.

    Notes
    -----
    Item popularity is Zipf-like: restarts draw items by Zipf weights, and
    noise draws come from the global Zipf distribution.  Positions are
    simulated for all users at once, so the Python loop runs over sequence
    positions only.
    """
    for name, value, low in (
        ("num_users", num_users, 1),
        ("num_items", num_items, 1),
        ("mean_length", mean_length, _MIN_LENGTH),
        ("num_clusters", num_clusters, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_clusters > num_items:
        raise ValueError(f"num_clusters ({num_clusters}) must not exceed num_items ({num_items})")

    rng = streams.rng(seed, Stream.SYNTHETIC)

    # Items: a random chain order, cut into contiguous per-cluster blocks.
    chain = rng.permutation(num_items)  # (I,) chain position -> item index 0..I-1
    block_start = (np.arange(num_clusters + 1) * num_items) // num_clusters  # (C+1,)
    block_size = np.diff(block_start)  # (C,)
    block_of = np.repeat(np.arange(num_clusters), block_size)  # (I,) cluster of chain position
    ranks = rng.permutation(num_items) + 1  # (I,) popularity rank of each item
    weight = 1.0 / ranks.astype(np.float64) ** _ZIPF_EXPONENT  # (I,) by item index
    global_cdf = np.cumsum(weight) / weight.sum()  # (I,) over item index
    global_cdf[-1] = 1.0
    # Per-cluster CDFs packed into one array: cluster c occupies keys (c, c + 1],
    # so one searchsorted with key c + r samples from cluster c.
    chain_weight = weight[chain]  # (I,) by chain position
    local = np.cumsum(chain_weight)  # (I,)
    before = np.concatenate(([0.0], local[block_start[1:-1] - 1]))  # (C,) mass before each block
    block_total = np.add.reduceat(chain_weight, block_start[:-1])  # (C,)
    keys = block_of + (local - before[block_of]) / block_total[block_of]  # (I,)
    keys[block_start[1:] - 1] = np.arange(1, num_clusters + 1)  # exact block ends

    # Users: a cluster and a length each.
    cluster = rng.integers(num_clusters, size=num_users)  # (U,)
    mu = np.log(mean_length) - _LENGTH_SIGMA**2 / 2  # log-normal with the requested mean
    raw_length = rng.lognormal(mu, _LENGTH_SIGMA, size=num_users)
    length = np.clip(np.rint(raw_length), _MIN_LENGTH, 10 * mean_length).astype(np.int64)  # (U,)
    max_length = int(length.max())

    def restart(users: np.ndarray) -> np.ndarray:
        """Chain positions of Zipf draws from each user's own cluster."""
        draw = cluster[users] + rng.random(len(users))
        return np.minimum(np.searchsorted(keys, draw, side="right"), num_items - 1)

    everyone = np.arange(num_users)
    position = restart(everyone)  # (U,) current chain position
    items = np.empty((num_users, max_length), dtype=np.int64)  # (U, T) item index 0..I-1
    items[:, 0] = chain[position]
    start = block_start[cluster]  # (U,) first chain position of each user's cluster
    size = block_size[cluster]  # (U,)
    for t in range(1, max_length):
        move = rng.random(num_users)  # (U,)
        step = rng.geometric(_STEP_P, size=num_users)  # (U,) >= 1
        stepped = start + (position - start + step) % size  # (U,) wrap inside the cluster block
        jumped = restart(everyone)  # (U,)
        noise = np.searchsorted(global_cdf, rng.random(num_users), side="right")  # (U,) item index
        noise = np.minimum(noise, num_items - 1)
        on_chain = move < _P_STEP + _P_CLUSTER_JUMP  # (U,) noise leaves the position alone
        position = np.where(move < _P_STEP, stepped, np.where(on_chain, jumped, position))
        items[:, t] = np.where(on_chain, chain[position], noise)

    gaps = rng.exponential(_MEAN_GAP, size=(num_users, max_length)).astype(np.int64) + 1  # (U, T) >= 1
    begin = _BASE_TIME + rng.integers(0, 30 * 24 * 3_600, size=num_users)  # (U,)
    times = begin[:, None] + np.cumsum(gaps, axis=1)  # (U, T) strictly increasing per user

    valid = np.arange(max_length)[None, :] < length[:, None]  # (U, T)
    user_col = np.broadcast_to(np.arange(1, num_users + 1)[:, None], valid.shape)[valid]  # (n,)
    item_col = items[valid] + 1  # (n,)
    time_col = times[valid]  # (n,)
    order = np.lexsort((user_col, time_col))  # log order: by time, then user
    return pd.DataFrame(
        {
            "user": user_col[order].astype(np.int64),
            "item": item_col[order].astype(np.int64),
            "timestamp": time_col[order].astype(np.int64),
        }
    )
