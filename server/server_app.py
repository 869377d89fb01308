"""fedkd ServerApp: parse the run config once, prepare (or, with ``resume``, reopen) the results
folder, run the rounds."""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedkd import processes
from fedkd.checks import check_run_config
from fedkd.results import prepare_dir, write_json
from server.experiment import Experiment
from wire.waits import FLOWER_INITIAL_BACKOFF, shorten_object_pulls

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The one validation step of every entry point (`fedkd run` calls it too): a bad value fails here,
    # before anything is written or round 1 starts, with the message `fedkd run` gives for it.
    cfg, _ = check_run_config(context.run_config)
    if cfg.reply_poll_interval < FLOWER_INITIAL_BACKOFF:
        # On a SuperLink a reply is announced before its content has arrived: retry the content at
        # the polls' pace, not after Flower's 1 s, 2 s, ... (simulation pulls no objects: no effect)
        shorten_object_pulls(cfg.reply_poll_interval)
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
    _record_flower_processes(out)
    Experiment(cfg, out).run(grid)


def _record_flower_processes(out: Path) -> None:
    """Under `flwr run` (or a deployment) write ``processes.json``: the Flower processes serving
    this run, so that ``fedkd stop <results folder>`` can stop exactly them afterwards (Flower
    leaves its local SuperLink running). Under ``fedkd run`` no Flower process is above the
    ServerApp, nothing is left behind, and no file is written."""
    me = [os.getpid()] if processes.flower_name(processes.command_line(os.getpid())) else []
    chain = [e for pid in me + processes.flower_ancestors() if (e := processes.entry(pid)) is not None]
    if not chain:
        return
    processes.write(out / processes.FILE, chain, note="the Flower processes that served this run (nearest "
                    "first); `fedkd stop` on this folder stops them and what they started, by PID")
    logging.getLogger("fedkd").info("Flower processes serving this run: %s; `fedkd stop %s` stops exactly these",
                                    ", ".join(f"{e['name']} {e['pid']}" for e in chain), out)


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
