"""``fedkd data FILE``: load and check an interaction file exactly as a run would, and say what is in it.

It reads FILE with the data options of ``fedkd run`` (and any ``--config`` files), runs the
checks a run makes on the data and the fleet size before its engine starts (fedkd.checks;
the device, privacy and resume checks are left to ``fedkd run``), and prints users, items,
interactions, what loading dropped, the time range, and the cloud / edge / proxy sizes and
the number of clients under those settings. A file a run would refuse exits 2 with the same
message. Nothing is written.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from simulations.options import RawHelpFormatter, add_config_options, blame, config_values, read_overrides

#: The options that decide what loading keeps and how the population is laid out.
DATA_KEYS = ("data-format", "data-columns", "data-min-interactions", "data-drop-short-users", "data-duplicates",
             "cloud-fraction", "users-per-client", "seed", "proxy-size", "clients-per-round")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="Load and check an interaction file as a run would; print what is in it.",
                       description=__doc__, formatter_class=RawHelpFormatter,
                       usage="fedkd data FILE [--config FILE] [--data-format F] [--KEY VALUE ...]")
    p.add_argument("file", metavar="FILE", help="The interaction file (as --data-path of `fedkd run`).")
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="TOML file of overrides, as for `fedkd run`; may repeat, later files win; options win "
                        "over files.")
    add_config_options(p, DATA_KEYS, title="{section} settings (as in `fedkd run`)")


def main(args: argparse.Namespace) -> int:
    from fedkd.checks import check_run_config
    from simulations.runner import resolve_overrides

    files, where = read_overrides(args.config)
    typed = {**config_values(args), "data-path": args.file}
    where = {k: v for k, v in where.items() if k not in typed}  # what the command line set is not the file's
    with blame(where):
        # absolute paths, as a run has; devices=False: the device checks need torch, 2 s more
        cfg, plan = check_run_config(resolve_overrides({**files, **typed}), devices=False)
    print("\n".join(summary_lines(cfg, plan)))
    return 0


def summary_lines(cfg, plan) -> list[str]:
    from fedkd.data import resolve_format

    ds = plan.population.dataset
    st = ds.stats
    fmt = resolve_format(cfg.data_path, cfg.data_format)
    dup_fate = {"drop": "dropped", "keep": "kept", "error": "refused"}[cfg.data_duplicates]
    short = (f"{st.short_users} below --data-min-interactions {cfg.data_min_interactions}"
             + (f", dropped with their {st.short_rows_dropped} rows" if st.short_rows_dropped else ""))
    per_round = cfg.clients_per_round or plan.num_clients
    rows = [
        ("file", f"{ds.source} (format {fmt})"),
        ("rows read", f"{st.rows}"),
        ("exact duplicates", f"{st.exact_duplicates} found, {st.duplicates_dropped} dropped "
                             f"(--data-duplicates {cfg.data_duplicates}: {dup_fate})"),
        ("users", f"{ds.num_users} ({short})"),
        ("items", f"{ds.num_items}"),
        ("interactions", f"{ds.num_interactions} ({st.repeated_items} repeat an item the user already had; "
                         f"{st.timestamp_ties} share the user's previous timestamp, kept in file order)"),
        ("time range", _time_range(st.first_timestamp, st.last_timestamp)),
        ("cloud users", f"{plan.num_cloud_users} (--cloud-fraction {cfg.cloud_fraction}), "
                        f"{plan.cloud_prefixes} training prefixes"),
        ("edge users", f"{plan.num_edge_users} in {plan.num_clients} clients "
                       f"(--users-per-client {cfg.users_per_client})"),
        ("proxy set", f"{plan.proxy_rows} rows (--proxy-size {cfg.proxy_size})" if cfg.needs_proxy
                      else f"none (protocol {cfg.protocol} with kd-weight {cfg.kd_weight} needs none)"),
        ("clients per round", f"{per_round}" + (" (every client)" if not cfg.clients_per_round else "")),
    ]
    width = max(len(name) for name, _ in rows)
    out = [f"{name:<{width}}  {text}" for name, text in rows]
    out += [f"note: {n}" for n in plan.notes]
    out.append("ok: the data and the fleet size pass a run's checks (`fedkd run` also checks the devices, "
               "privacy and resume settings)")
    return out


def _time_range(first: int | None, last: int | None) -> str:
    if first is None or last is None:
        return "-"

    def iso(t: int) -> str:
        try:
            return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):
            return "beyond year 9999 (milliseconds?)"
    return f"{iso(first)} .. {iso(last)} UTC ({first} .. {last})"
