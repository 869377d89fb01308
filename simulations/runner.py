"""Run one fedkd experiment on Flower's simulation engine, in this process.

This does what ``flwr run`` does for a local simulation (the ``flwr-simulation``
process): fuse the app's declared config with the overrides, then start the ServerApp
and the ClientApps by their component names from ``pyproject.toml``. Running it
in-process skips the local SuperLink and the FAB build, shows fedkd's progress bar
directly, and lets the config and data be validated before the engine starts, so a bad
value fails in a second with a clear message instead of inside a Ray worker.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from fedkd.checks import check_experiment
from fedkd.config import ExperimentConfig, Scalar
from fedkd.population import population

APP_DIR = Path(__file__).resolve().parents[1]
PATH_KEYS = ("output-dir", "cache-dir", "data-path")


def overrides_toml(overrides: Mapping[str, Scalar]) -> str:
    """Flat overrides as the TOML text that `fedkd run --config` and `flwr run --run-config` read."""
    import tomli_w

    return tomli_w.dumps(dict(overrides))


def resolve_overrides(overrides: Mapping[str, Scalar], *, base: Path | None = None) -> dict[str, Scalar]:
    """Validate overrides and make path values absolute (the apps may run from a copy)."""
    out = dict(overrides)
    cfg = ExperimentConfig.from_flat(out)  # raises a ValueError that names the key
    base = base or Path.cwd()
    for key in PATH_KEYS:
        value = out.get(key, getattr(cfg, key.replace("-", "_")))
        if value:
            out[key] = str((base / Path(str(value)).expanduser()).resolve())
    return out


def run_experiment(overrides: Mapping[str, Scalar], *, num_cpus: int | None = None,
                   verbose: bool = False) -> Path:
    """Run one experiment; return its results folder."""
    overrides = resolve_overrides(overrides)
    if not sys.stderr.isatty():  # a bar redrawn with \r between log lines garbles a log file or pipe
        overrides["progress"] = False
    # The app's declared defaults are the dataclass's (tests/test_config.py), so this is the config
    # the ServerApp will parse; checking it before Flower is even imported keeps a refusal fast.
    plan = check_experiment(ExperimentConfig.from_flat(overrides))  # every feasibility check; writes nothing
    num_clients = plan.num_clients
    log = logging.getLogger("fedkd")
    log.info("%s", plan.describe())
    for note in plan.notes:
        log.info("note: %s", note)

    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    fused = get_fused_config_from_dir(APP_DIR, overrides)
    cfg = ExperimentConfig.from_flat(fused)
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(overrides)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    cpus = num_cpus or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR",
                             "log_to_driver": True}}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if os.environ.get("FEDKD_FLOWER_DISPATCH", "") != "1":  # =1 keeps Flower's own (for comparisons)
        from simulations.fast_dispatch import install
        install()
    logging.getLogger("fedkd").info("starting Flower simulation: %d clients on %d CPUs", num_clients, cpus)
    _run_simulation(
        num_supernodes=num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        backend_name="ray", backend_config=backend, client_app_attr="clients.client_app:app",
        server_app_attr="server.server_app:app", server_app_context=context, app_dir=str(APP_DIR),
        run=run, verbose_logging=verbose, is_app=True)
    out = Path(cfg.output_dir) / cfg.experiment_name
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without a summary in {out}; see {out / 'run.log'}")
    return out
