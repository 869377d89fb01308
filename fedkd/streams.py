"""Every random stream of an experiment, named in one place.

Each draw in fedkd comes from ``np.random.default_rng([seed, stream, *ids])`` (or, for torch's
dropout masks, a seed derived from the same key), so a run is a pure function of its config
and seed, and a draw never depends on the order in which other draws happen. Two draws share
numbers only if they share the whole key; giving every stream its own tag here, instead of a
magic number in the module that draws, is what keeps them apart. Before this module, central
DP noise drew from ``[seed, 11, round]``, the key of device jitter ``[seed, 11, partition]``,
so round r's noise equalled client r's jitter draws; local DP shared availability's tag 12.

Tags are part of the results: changing one changes every run that uses the stream. Add new
streams with new numbers; never reuse a number.
"""

from __future__ import annotations

from enum import IntEnum, unique

import numpy as np


@unique
class Stream(IntEnum):
    """Tag of a random stream; the ids that complete its key follow each name."""

    CLOUD_USERS = 1        # which users the cloud holds
    CLIENT_USERS = 2       # how edge users are shuffled into clients
    TIERS = 3              # which device tier each client gets
    PROXY_SET = 4          # which cloud histories form the proxy set
    PROXY_BATCH = 5        # (round,) the proxy rows of a round
    LOCAL_TRAIN = 6        # (round, partition) a client's batches and stochastic rounding
    LOCAL_DROPOUT = 7      # (round, partition) torch seed of a client's dropout masks
    SELECTION = 8          # (round,) which clients are sampled
    TEACHER_REFINE = 9     # (round,) teacher refinement batches and dropout
    SERVER_DISTILL = 10    # (round,) the proxy protocol's server-side distillation
    DEVICE_JITTER = 11     # (partition,) a device's spread around its tier
    AVAILABILITY = 12      # (round, partition) whether a device is online
    FAULTS = 13            # (round, partition) injected faults
    CENTRAL_DP_NOISE = 14  # (round,) Gaussian noise added to the aggregate
    LOCAL_DP_NOISE = 15    # (round, partition) Gaussian noise a device adds to its update
    VAL_SAMPLE = 16        # the fixed clients validated each round (val-clients)
    CLIP_COUNT_NOISE = 18  # (round,) adaptive clipping's noise on the count of unclipped updates (18: issue 18's
    #                        number, as COMPRESS_RECOVERY below)
    COMPRESS_RECOVERY = 20  # fedkd.recover: held-out rows and fine-tune batches (20: issue 20's number,
    #                         clear of tags other branches may be adding)
    WARM_START = 21        # the server's warm start of the global student (batches and dropout)
    DISTRIBUTED_DP_NOISE = 181  # (round, partition) a device's discrete Gaussian noise share (distributed DP;
    #                             181: issue 18's second stream, clear of the small numbers other branches take)
    SECAGG_GRAPH = 182     # (round,) the order of SecAgg+'s neighbour ring (secagg-shares)
    SYNTHETIC = 0x5E0      # the synthetic data generator


def key(seed: int, stream: Stream, *ids: int) -> list[int]:
    """The seed-sequence key of one draw: ``[seed, tag, *ids]``."""
    return [int(seed), int(stream), *(int(i) for i in ids)]


def rng(seed: int, stream: Stream, *ids: int) -> np.random.Generator:
    """A generator for one draw of ``stream``; the same arguments always give the same numbers."""
    return np.random.default_rng(key(seed, stream, *ids))


def torch_seed(seed: int, stream: Stream, *ids: int) -> int:
    """A 31-bit torch seed for one draw of ``stream`` (dropout masks); Python's hash of an int
    tuple is fixed across processes, unlike that of a string."""
    return hash(tuple(key(seed, stream, *ids))) % 2**31
