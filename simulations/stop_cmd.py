"""``fedkd stop DIR``: stop exactly the processes a run or a deployment recorded, by PID.

`flwr run .` leaves Flower's local SuperLink (with its SuperExec and simulation processes)
running after the run. The fedkd ServerApp records the Flower processes that serve its run
in ``<results folder>/processes.json`` (PID, start time, command); ``fedkd deploy local``
records its SuperLink, SuperNodes and ``flwr`` processes in ``<state-dir>/processes.json``.
This command sends SIGTERM to those processes and to every process they started, then SIGKILL
to what is left after --grace seconds. A PID is signalled only while it still names the
recorded process (same start time): nothing else of yours is touched, unlike
``pkill -f flower-superlink``.

DIR is a results folder (outputs/<name>), a deployment's --state-dir, or a processes.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations.options import HelpFormatter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stop", help="Stop exactly the Flower processes a run or deployment recorded (by PID).",
                       description=__doc__, formatter_class=HelpFormatter, usage="fedkd stop DIR [--grace S]")
    p.add_argument("dir", type=Path, metavar="DIR",
                   help="Results folder, deployment state folder, or processes.json.")
    p.add_argument("--grace", type=float, default=10.0,
                   help="Seconds between SIGTERM and SIGKILL.")


def main(args: argparse.Namespace) -> int:
    from fedkd.processes import stop

    left = stop(args.dir, grace=args.grace, out=lambda s: print(s, flush=True))
    return 1 if left else 0
