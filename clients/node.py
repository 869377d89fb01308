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

from fedkd.config import ExperimentConfig
from fedkd.edge import ClientData, client_data
from fedkd.feedback import DeviceStore, device_folder
from wire import Content, config_of


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_flat(dict(items))


def setup(context: Context) -> tuple[ExperimentConfig, ClientData]:
    """This node's config and data: the run config, with the device's own ``data-path`` if its
    node config names one (``flower-supernode --node-config "partition-id=0 data-path=..."``).
    Both are cached per process, so a mod and the handler after it pay for them once."""
    torch.set_num_threads(1)  # one simulated client per worker core
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<i> num-partitions=<n>\" (i in 0..n-1, "
                         "n = the fleet size; see docs/devices.md)")
    run_config = dict(context.run_config)
    if "data-path" in node:  # the device's own copy of the (same) interaction file
        run_config["data-path"] = str(node["data-path"])
    cfg = _config(tuple(sorted(run_config.items())))
    return cfg, client_data(cfg, int(node["partition-id"]))


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
