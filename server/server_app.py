"""fedkd ServerApp: parse the run config once, prepare (or, with ``resume``, reopen) the results
folder, run the rounds."""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedkd.checks import check_experiment
from fedkd.config import ExperimentConfig
from fedkd.results import prepare_dir, write_json
from server.experiment import Experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = ExperimentConfig.from_flat(context.run_config)
    check_experiment(cfg)  # the one validation step every entry point runs: before anything is written
    out = Path(cfg.output_dir).expanduser().resolve() / cfg.experiment_name
    if cfg.resume:  # continue in place from the last checkpoint (the server checks it matches)
        if not out.is_dir():
            raise ValueError(f"cannot resume: no results folder {out}")
        _log_to(out / "run.log")
        logging.getLogger("fedkd").info("resuming the run in %s", out)
    else:
        moved = prepare_dir(out)
        _log_to(out / "run.log")
        if moved:
            logging.getLogger("fedkd").info("previous results moved to %s", moved)
        write_json(out / "config.json", {"config": cfg.to_flat(), "python": sys.version.split()[0],
                                         "platform": platform.platform(), "versions": _versions()})
    Experiment(cfg, out).run(grid)


def _log_to(path: Path) -> None:
    logger = logging.getLogger("fedkd")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(path)):
        h.setFormatter(fmt)
        logger.addHandler(h)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("flwr", "torch", "numpy", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out
