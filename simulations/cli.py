"""``fedkd`` command line: every config key is an option, with its help and default."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tomllib
from pathlib import Path

from fedkd.config import ExperimentConfig, Scalar
from simulations import audit_cmd, deploy, export_cmd, report, sweep


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="Run one experiment on Flower's simulation engine.",
        description="Run one fedkd experiment (Flower simulation engine, one client per edge "
                    "partition). With no options: synthetic data, a small fleet, a few minutes "
                    "on 2 cores. Results go to <output-dir>/<experiment-name>/. A checkpoint is "
                    "written after every round; if the run is killed, the same command with "
                    "--resume continues after the last complete round and ends with the results "
                    "an uninterrupted run would have written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="TOML file of overrides (flat kebab-case keys, as in simulations/*.toml); "
                        "may repeat, later files win; command-line options win over files.")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs the simulation engine may use (default: all).")
    p.add_argument("--verbose", action="store_true", help="Flower debug logging.")
    group = p.add_argument_group("experiment settings (also in [tool.flwr.app.config])")
    for key, default, text in ExperimentConfig.help_table():
        kind = type(default)
        if kind is bool:  # `--resume` alone means true; `--progress false` still works
            group.add_argument(f"--{key}", dest=f"cfg:{key}", default=None, metavar="BOOL", nargs="?", const=True,
                               type=_parse_bool, help=f"{text} (default: {default!r}; bare --{key} = true)")
        else:
            group.add_argument(f"--{key}", dest=f"cfg:{key}", default=None, metavar=kind.__name__.upper(),
                               type=kind, help=f"{text} (default: {default!r})")


def _parse_bool(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def load_overrides(files: list[Path]) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for f in files:
        try:
            data = tomllib.loads(f.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{f}: cannot read overrides: {exc}") from None
        out.update(data)
    ExperimentConfig.from_flat(out)  # name the bad key before anything starts
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["calibrate"]:  # its own parser: it needs no experiment config
        from simulations import calibrate
        return calibrate.main(argv[1:])
    parser = argparse.ArgumentParser(prog="fedkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    sweep.add_parser(sub)
    report.add_parser(sub)
    deploy.add_parser(sub)
    export_cmd.add_parser(sub)
    audit_cmd.add_parser(sub)
    sub.add_parser("calibrate", add_help=False,
                   help="Measure this machine's step and top-10 times per student width "
                        "(writes a calibration profile; `fedkd calibrate --help`).")
    args = parser.parse_args(argv)
    command = "fedkd " + shlex.join(argv)
    try:
        if args.command == "run":
            overrides = load_overrides(args.config)
            overrides.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None})
            from simulations.runner import run_experiment  # Flower/Ray import only when needed
            out = run_experiment(overrides, num_cpus=args.num_cpus, verbose=args.verbose)
            print(json.dumps(json.loads((out / "summary.json").read_text()), indent=2))
            print(f"results: {out}")
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
    except ValueError as exc:
        print(f"fedkd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
