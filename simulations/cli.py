"""``fedkd`` command line: every config key is an option, with its help and default."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from simulations import audit_cmd, data_cmd, deploy, export_cmd, report, shard_cmd, stop_cmd, sweep
from simulations.options import (HelpFormatter, Parser, add_config_options, blame, config_values, load_overrides,
                                 read_overrides)
from simulations.runner import STARTUP_TIMEOUT_S

__all__ = ["load_overrides", "main"]  # load_overrides: re-exported for sweep, baselines and older scripts


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="Run one experiment on Flower's simulation engine.",
        description="Run one fedkd experiment (Flower simulation engine, one client per edge "
                    "partition). With no options: synthetic data, a small fleet, a few minutes "
                    "on 2 cores. Results go to <output-dir>/<experiment-name>/. A checkpoint is "
                    "written after every round; if the run is killed, the same command with "
                    "--resume continues after the last complete round and ends with the results "
                    "an uninterrupted run would have written. The settings below are grouped by "
                    "section; each is also a key of [tool.flwr.app.config] (`flwr run . --run-config`).",
        usage="fedkd run [--config FILE] [--num-cpus N | --ray-address HOST:PORT] [--startup-timeout SECONDS] "
              "[--verbose] [--KEY VALUE ...]",
        formatter_class=HelpFormatter)
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="TOML file of overrides (flat kebab-case keys, as in simulations/*.toml); "
                        "may repeat, later files win; command-line options win over files.")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs the simulation engine may use (default: all).")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="Run the ClientApps on an existing Ray cluster (started with `ray start --head --port "
                        "PORT` on HOST and `ray start --address HOST:PORT` on the other machines) instead of "
                        "starting Ray here: each node runs one ClientApp worker per CPU it declared; the "
                        "ServerApp runs in this process, which must be on a node of the cluster. Every node "
                        "needs the same Python environment, fedkd checkout and data file at the same paths "
                        "(docs/cluster.md). Checked before anything starts: an address where nothing answers "
                        "is refused (exit code 2). Excludes --num-cpus. Without it, RAY_ADDRESS is ignored.")
    p.add_argument("--verbose", action="store_true", help="Flower debug logging.")
    p.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S, metavar="SECONDS",
                   help="Seconds the simulation engine may take to come up: to start Ray and its workers, "
                        "and then to answer its first message (the teacher's training is not counted). "
                        "Past it, or when the engine fails while starting, the run stops with a message "
                        "and exit code 3 instead of hanging; 0 waits forever.")
    add_config_options(p)  # one group per config section; every key is also in [tool.flwr.app.config]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """Show fedkd's log lines (the data, the checks' notes) before the ServerApp takes the logger
    over and adds run.log."""
    logger = logging.getLogger("fedkd")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def build_parser() -> Parser:
    """The ``fedkd`` parser with every subcommand (``calibrate`` is listed; it parses its own)."""
    parser = Parser(prog="fedkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    data_cmd.add_parser(sub)
    shard_cmd.add_parser(sub)
    sweep.add_parser(sub)
    report.add_parser(sub)
    deploy.add_parser(sub)
    export_cmd.add_parser(sub)
    audit_cmd.add_parser(sub)
    stop_cmd.add_parser(sub)
    sub.add_parser("calibrate", add_help=False,
                   help="Measure this machine's step and top-10 times per student width "
                        "(writes a calibration profile; `fedkd calibrate --help`).")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["calibrate"]:  # its own parser: it needs no experiment config
        from simulations import calibrate
        return calibrate.main(argv[1:])
    args = build_parser().parse_args(argv)
    command = "fedkd " + shlex.join(argv)
    try:
        if args.command == "run":
            files, where = read_overrides(args.config)
            typed = config_values(args)  # the command line wins over files: its keys are not the files' to blame
            where = {k: v for k, v in where.items() if k not in typed}
            from simulations.end_of_run import summary_lines
            from simulations.runner import run_experiment  # Flower/Ray import only when needed
            _log_to_stderr()
            with blame(where):
                out = run_experiment({**files, **typed}, num_cpus=args.num_cpus, verbose=args.verbose,
                                     startup_timeout=args.startup_timeout, ray_address=args.ray_address)
            print("\n".join(summary_lines(out)))
        elif args.command == "data":
            return data_cmd.main(args)
        elif args.command == "shard":
            return shard_cmd.main(args)
        elif args.command == "sweep":
            return sweep.main(args, command)
        elif args.command == "report":
            return report.main(args, command)
        elif args.command == "deploy":
            return deploy.main(args)
        elif args.command == "export":
            return export_cmd.main(args)
        elif args.command == "audit":
            return audit_cmd.main(args)
        elif args.command == "stop":
            return stop_cmd.main(args)
    except ValueError as exc:
        print(f"fedkd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
