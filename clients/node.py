"""What a device knows about itself: its config, its data, its storage, the round a message is for.

Shared by the ClientApp's handlers and its mods (``clients/mods/``): a mod runs before the
handler, so it cannot take these from the handler, and a mod that worked them out its own way
could disagree with it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from flwr.app import Context, Message

from fedkd import shards
from fedkd.config import ExperimentConfig
from fedkd.edge import ClientData, client_data, shard_client_data
from fedkd.feedback import DeviceStore, device_folder
from fedkd.population import data_stamp, population
from fedkd.shards import Fingerprint, Shard
from wire import Content, config_of


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_flat(dict(items))


def setup(context: Context) -> tuple[ExperimentConfig, ClientData]:
    """This node's config and data: the run config, and the device's data as its node config
    names it: its own shard (``shard="/path/device-0"``, fedkd.shards: only its users' histories
    are read), or its own copy of the interaction file (``data-path=...``), or, with neither,
    the run config's data. Both are cached per process, so a mod and the handler after it pay
    for them once."""
    torch.set_num_threads(1)  # one simulated client per worker core
    node = context.node_config
    if "shard" in node and "data-path" in node:
        raise ValueError("this SuperNode's node config names both a 'shard' and a 'data-path'; a device runs "
                         "from its shard alone: drop data-path")
    run_config = dict(context.run_config)
    if "shard" in node:
        shard = _shard(str(node["shard"]))
        if "partition-id" in node and int(node["partition-id"]) != shard.partition_id:
            raise ValueError(f"node config says partition-id {node['partition-id']} but its shard {shard.path} "
                             f"is partition {shard.partition_id}'s; drop partition-id or give the right shard")
        cfg = _config(tuple(sorted(run_config.items())))
        return cfg, _shard_data(cfg, str(node["shard"]))
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<i> num-partitions=<n>\" (i in 0..n-1, "
                         "n = the fleet size; see docs/devices.md)")
    if "data-path" in node:  # the device's own copy of the (same) interaction file
        run_config["data-path"] = str(node["data-path"])
    cfg = _config(tuple(sorted(run_config.items())))
    return cfg, client_data(cfg, int(node["partition-id"]))


def fingerprint(context: Context, cfg: ExperimentConfig, data: ClientData) -> Fingerprint:
    """What this device's data is (fedkd.shards), for the handshake: its shard's (checked against
    its histories when loaded), or computed from the population it derived."""
    if "shard" in context.node_config:
        return _shard(str(context.node_config["shard"])).fingerprint
    return shards.fingerprint(cfg, population(cfg), data.partition_id)


def _shard_stamp(path: str) -> tuple:
    """The identity of a shard's files (``fedkd.population.data_stamp`` of its manifest and
    histories): a long-lived ClientApp worker reads a shard again once it is replaced."""
    return tuple(data_stamp(str(Path(path).expanduser() / name)) for name in (shards.MANIFEST, shards.HISTORIES))


def _shard(path: str) -> Shard:
    return _load_shard(path, _shard_stamp(path))


@functools.lru_cache(maxsize=8)
def _load_shard(path: str, stamp: tuple) -> Shard:  # stamp: cache key only
    return shards.load_shard(path)


def _shard_data(cfg: ExperimentConfig, path: str) -> ClientData:
    return _shard_data_cached(cfg, path, _shard_stamp(path))


@functools.lru_cache(maxsize=8)
def _shard_data_cached(cfg: ExperimentConfig, path: str, stamp: tuple) -> ClientData:  # stamp: cache key only
    return shard_client_data(cfg, _shard(path))


def store(cfg: ExperimentConfig, context: Context, partition_id: int) -> DeviceStore:
    """This device's own folder for this run.

    A real device names its storage in its node config (``flower-supernode --node-config
    "partition-id=0 state-dir=/var/lib/fedkd"``). In simulation every device is a worker
    process on the machine that runs the server, so the default is the results folder
    (``<output-dir>/<experiment-name>/device-state/``): a new run of the experiment moves the
    old folder aside and starts with empty devices, and what the devices kept can be
    inspected afterwards.
    """
    base = context.node_config.get("state-dir")
    if not base:
        base = (Path(cfg.output_dir).expanduser().resolve() / cfg.experiment_name / "device-state")
    return DeviceStore(device_folder(str(base), context.run_id, partition_id))


def round_of(msg: Message) -> int:
    """The round a message belongs to, read from its config record alone: a mod needs it before
    the handler decodes the arrays, and decoding them twice would cost a student per message."""
    configs = {name: dict(rec) for name, rec in msg.content.config_records.items()}
    return int(config_of(Content(configs=configs), "config", "round", int))
