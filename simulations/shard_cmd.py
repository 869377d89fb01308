"""``fedkd shard --out DIR``: cut the data into one shard per device, each holding only its own users.

With the data settings of ``fedkd run`` (``--config`` files, ``--run-config``, ``--KEY VALUE``)
it loads the data and lays out the population exactly as a run would (the same checks), then
writes ``DIR/device-<i>/`` for every edge partition i: ``histories.npz`` (partition i's users'
histories, nothing else) and ``manifest.json`` (partition id, fleet size, catalogue size, the
settings, and the fingerprint the server checks at the handshake). ``DIR/run-config.toml`` holds
the settings the shards were cut with: run the server with them (``flwr run . CONNECTION
--run-config DIR/run-config.toml``). Copy ``device-i`` to device i and start its SuperNode with
``--node-config 'shard="/path/to/device-i"'``. See docs/devices.md, "Device shards".

``--nodes N`` fits ``users-per-client`` to N devices as ``fedkd deploy local --nodes N`` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations.options import RawHelpFormatter, add_config_options, config_values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="Write one shard per device: only its own users' histories, plus a manifest.",
                       description=__doc__, formatter_class=RawHelpFormatter,
                       usage="fedkd shard --out DIR [--nodes N] [--config FILE] [--run-config \"K=V ...\"] "
                             "[--force] [--KEY VALUE ...]")
    p.add_argument("--out", type=Path, required=True, help="Folder for device-<i>/ and run-config.toml (created).")
    p.add_argument("--nodes", type=int, default=None,
                   help="Devices the fleet has: fit users-per-client to them (as `fedkd deploy local --nodes`).")
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="TOML file of overrides, as for `fedkd run`; may repeat.")
    p.add_argument("--run-config", action="append", default=[], metavar='"K=V ..."',
                   help="Overrides in flwr's syntax (strings quoted); after --config files.")
    p.add_argument("--force", action="store_true", help="Replace shards already in --out.")
    add_config_options(p, title="{section} settings (as in `fedkd run`; the run's settings go to run-config.toml)")


def main(args: argparse.Namespace) -> int:
    from fedkd.checks import check_run_config
    from fedkd.shards import write_shards
    from simulations.deploy import fit_fleet, load_settings
    from simulations.runner import overrides_toml, resolve_overrides

    overrides = resolve_overrides(load_settings(args.config, args.run_config, config_values(args)))
    if args.nodes is not None:
        overrides = fit_fleet(overrides, args.nodes)
    cfg, plan = check_run_config(overrides, devices=False)
    folders = write_shards(cfg, plan.population, args.out, replace=args.force)
    (args.out / "run-config.toml").write_text(overrides_toml(overrides))
    print(plan.describe())
    for line in summary_lines(folders):
        print(line)
    print(f"settings: {args.out / 'run-config.toml'} (give the server these: flwr run . CONNECTION --run-config ...)")
    return 0


def summary_lines(folders: list[Path]) -> list[str]:
    import json
    out = []
    for folder in folders:
        m = json.loads((folder / "manifest.json").read_text())
        size = sum(p.stat().st_size for p in folder.iterdir())
        out.append(f"{folder}: partition {m['partition-id']} of {m['num-partitions']}, {m['users']} users, "
                   f"{m['interactions']} interactions, {size} bytes, partition digest "
                   f"{m['fingerprint']['partition'][:12]}")
    if folders:
        fp = json.loads((folders[0] / "manifest.json").read_text())["fingerprint"]
        out.append(f"fleet fingerprint {fp['fleet']} (data {fp['data'][:12]}, config {fp['config'][:12]}: "
                   f"{fp['settings']})")
    return out
