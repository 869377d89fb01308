"""A client's private view: its users' training prefixes and held-out items.

Built from the deterministic population, or from the device's own shard (fedkd.shards), and
cached per process (one simulated worker serves many clients, Flower rebuilds the ClientApp
for every message, and a SuperNode's ClientApp worker serves many messages), keyed by the
whole config, the partition and the data file's identity (``fedkd.population.data_stamp``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedkd.budget import assign_tiers
from fedkd.config import ExperimentConfig
from fedkd.population import data_stamp, population
from fedkd.samples import EvalSet, eval_set, train_samples
from fedkd.shards import Shard


@dataclass(frozen=True)
class ClientData:
    partition_id: int
    users: np.ndarray
    train: tuple[np.ndarray, np.ndarray]  # (S, L) histories, (S,) next items
    valid: EvalSet
    test: EvalSet
    num_items: int
    tier: int


def client_data(cfg: ExperimentConfig, partition_id: int) -> ClientData:
    """Partition ``partition_id``'s view, derived from the whole population (every party can);
    cached per process by (config, partition, data file identity)."""
    return _cached(cfg, partition_id, data_stamp(cfg.data_path))


def shard_client_data(cfg: ExperimentConfig, shard: Shard) -> ClientData:
    """The same view from a device's own shard (fedkd.shards): only its users' histories are read.
    Equal, array for array, to :func:`client_data` of the population the shard was cut from."""
    return _build(cfg, shard.partition_id, shard.users, shard.sequences, num_items=shard.num_items,
                  num_clients=shard.num_partitions)


@functools.lru_cache(maxsize=4096)
def _cached(cfg: ExperimentConfig, partition_id: int, stamp: tuple = ()) -> ClientData:  # stamp: cache key only
    pop = population(cfg)
    if not 0 <= partition_id < pop.num_clients:
        raise ValueError(f"partition-id {partition_id} outside 0..{pop.num_clients - 1}: the fleet "
                         f"has {pop.num_clients} clients (check num-supernodes)")
    users = pop.clients[partition_id]
    return _build(cfg, partition_id, users, [pop.dataset.sequences[u] for u in users],
                  num_items=pop.dataset.num_items, num_clients=pop.num_clients)


def _build(cfg: ExperimentConfig, partition_id: int, users: np.ndarray, seqs: Sequence[np.ndarray], *,
           num_items: int, num_clients: int) -> ClientData:
    """A client's samples from its users' histories alone (``seqs[j]`` is user ``users[j]``'s)."""
    tiers = assign_tiers(num_clients, [s for _, s, _ in cfg.tiers], cfg.seed)
    rows = np.arange(len(users))  # eval rows index ``seqs``; each row is labelled with its user below
    return ClientData(
        partition_id=partition_id, users=users,
        train=train_samples([s[:-2] for s in seqs], cfg.max_len),
        valid=dataclasses.replace(eval_set(seqs, rows, "valid", cfg.max_len), users=np.array(users, dtype=np.int64)),
        test=dataclasses.replace(eval_set(seqs, rows, "test", cfg.max_len), users=np.array(users, dtype=np.int64)),
        num_items=num_items, tier=int(tiers[partition_id]))
