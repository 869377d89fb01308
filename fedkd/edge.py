"""A client's private view: its users' training prefixes and held-out items.

Built from the deterministic population and cached per process (one simulated worker
serves many clients, and Flower rebuilds the ClientApp for every message), keyed by the
whole config, the partition and the data file's identity (``fedkd.population.data_stamp``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedkd.budget import assign_tiers
from fedkd.config import ExperimentConfig
from fedkd.population import data_stamp, population
from fedkd.samples import EvalSet, eval_set, train_samples


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
    """This partition's data, cached per process by (config, partition, data file identity)."""
    return _cached(cfg, partition_id, data_stamp(cfg.data_path))


@functools.lru_cache(maxsize=4096)
def _cached(cfg: ExperimentConfig, partition_id: int, stamp: tuple = ()) -> ClientData:  # stamp: cache key only
    pop = population(cfg)
    if not 0 <= partition_id < pop.num_clients:
        raise ValueError(f"partition-id {partition_id} outside 0..{pop.num_clients - 1}: the fleet "
                         f"has {pop.num_clients} clients (check num-supernodes)")
    users = pop.clients[partition_id]
    seqs = pop.dataset.sequences
    tiers = assign_tiers(pop.num_clients, [s for _, s, _ in cfg.tiers], cfg.seed)
    return ClientData(
        partition_id=partition_id, users=users,
        train=train_samples([seqs[u][:-2] for u in users], cfg.max_len),
        valid=eval_set(seqs, users, "valid", cfg.max_len),
        test=eval_set(seqs, users, "test", cfg.max_len),
        num_items=pop.dataset.num_items, tier=int(tiers[partition_id]))
