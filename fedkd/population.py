"""The simulated world: the dataset, who is a cloud user, and which users each client holds.

Every party (server, each simulated client) derives this view independently from the
data settings and the seed, so nothing but model traffic needs to cross the wire. The
server only ever reads the cloud users; a client only ever reads its own partition.
Results are cached per process because Flower rebuilds the ClientApp for every message, keyed
by the data settings and the data file's identity (:func:`data_stamp`): a long-lived process
(a simulation worker, a SuperNode's ClientApp worker) that serves several runs builds again
when a setting or the file changes, and never hands out a population of another file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkd.config import ExperimentConfig
from fedkd.data import Dataset, build_dataset, load_interactions
from fedkd.split import partition_clients, split_population
from fedkd.synthetic import generate_synthetic

DATA_KEYS = ("data_path", "data_format", "data_columns", "data_min_interactions",
             "data_drop_short_users", "data_duplicates", "synthetic_users", "synthetic_items",
             "synthetic_mean_length", "synthetic_clusters", "cloud_fraction",
             "users_per_client", "seed")


@dataclass(frozen=True)
class Population:
    dataset: Dataset
    cloud_users: np.ndarray        # internal user indices the cloud may read
    clients: tuple[np.ndarray, ...]  # internal user indices per client (partition id = position)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @functools.cached_property
    def data_hash(self) -> str:
        """``Dataset.fingerprint()``, computed once per population (the server checks every device
        against it at the handshake; see fedkd.shards)."""
        return self.dataset.fingerprint()


def load_dataset(cfg: ExperimentConfig) -> Dataset:
    if cfg.data_path:
        df = load_interactions(cfg.data_path, fmt=cfg.data_format, columns=cfg.column_map)
        source = cfg.data_path
    else:
        df = generate_synthetic(num_users=cfg.synthetic_users, num_items=cfg.synthetic_items,
                                mean_length=cfg.synthetic_mean_length,
                                num_clusters=cfg.synthetic_clusters, seed=cfg.seed)
        source = (f"synthetic(users={cfg.synthetic_users}, items={cfg.synthetic_items}, "
                  f"seed={cfg.seed})")
    return build_dataset(df, min_interactions=cfg.data_min_interactions,
                         drop_short_users=cfg.data_drop_short_users, duplicates=cfg.data_duplicates,
                         source=source)


def data_stamp(path: str) -> tuple:
    """The identity of an interaction file: resolved path, size, modification time (ns), inode;
    ``()`` for synthetic data (no file: a pure function of the settings). Rewriting or replacing
    the file changes it; a stat, not a read, so it is cheap enough to check on every message."""
    if not path:
        return ()
    file = Path(path).expanduser()
    try:
        st = file.stat()
    except OSError:  # missing: loading it raises the error worth reading (and errors are not cached)
        return (str(file),)
    return (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def population(cfg: ExperimentConfig) -> Population:
    return _cached(tuple(getattr(cfg, k) for k in DATA_KEYS), data_stamp(cfg.data_path))


@functools.lru_cache(maxsize=4)
def _cached(key: tuple, stamp: tuple = ()) -> Population:  # stamp: only part of the cache key
    # Only the data-relevant fields decide the cache entry.
    cfg = ExperimentConfig().replace(**dict(zip(DATA_KEYS, key)))
    ds = load_dataset(cfg)
    cloud, edge = split_population(ds.num_users, cfg.cloud_fraction, cfg.seed)
    clients = partition_clients(edge, cfg.users_per_client, cfg.seed)
    return Population(dataset=ds, cloud_users=cloud, clients=tuple(clients))
