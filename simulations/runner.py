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
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from fedkd.checks import check_run_config
from fedkd.config import ExperimentConfig, Scalar
from fedkd.population import population
from simulations import cluster

APP_DIR = Path(__file__).resolve().parents[1]
PATH_KEYS = ("output-dir", "cache-dir", "data-path")
STARTUP_TIMEOUT_S = 300.0  # `fedkd run --startup-timeout`: minutes on a loaded machine are normal, forever is not
ENGINE_FAILED_EXIT = 3  # the exit code of a run whose simulation engine did not come up


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
                   verbose: bool = False, startup_timeout: float = STARTUP_TIMEOUT_S,
                   ray_address: str | None = None) -> Path:
    """Run one experiment; return its results folder.

    ``startup_timeout`` (seconds, 0 = no limit) bounds how long the simulation engine may take
    to come up (see :class:`EngineWatch`); an engine that does not come up, or fails while
    starting, ends this process with exit code 3 and a message instead of a hang.
    ``ray_address`` (``HOST:PORT``) runs the ClientApps on that existing Ray cluster instead of a
    Ray instance of ``num_cpus`` CPUs started here (:mod:`simulations.cluster`); the two exclude
    each other.
    """
    if ray_address:
        if num_cpus is not None:
            raise ValueError("--num-cpus and --ray-address exclude each other: on a Ray cluster each node's "
                             "`ray start --num-cpus` decides how many ClientApp workers it runs")
        cluster.parse_address(ray_address)
    overrides = resolve_overrides(overrides)
    if not sys.stderr.isatty():  # a bar redrawn with \r between log lines garbles a log file or pipe
        overrides["progress"] = False
    # The app's declared defaults are the dataclass's (tests/test_config.py), so this is the config
    # the ServerApp will parse, checked by the function it calls (the same message for a bad value);
    # checking it here, before Flower is even imported, keeps a refusal fast.
    _, plan = check_run_config(overrides)  # every key, value and feasibility check; writes nothing
    num_clients = plan.num_clients
    log = logging.getLogger("fedkd")
    log.info("%s", plan.describe())
    for note in plan.notes:
        log.info("note: %s", note)
    if ray_address:
        cluster.check_reachable(ray_address)  # still before Flower and Ray are imported

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
    backend = cluster.backend_config(num_cpus=cpus, ray_address=ray_address)
    if not ray_address and (dropped := cluster.drop_address_env()) is not None:
        log.info("RAY_ADDRESS=%s is ignored: without --ray-address, fedkd starts Ray on this machine", dropped)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if os.environ.get("FEDKD_FLOWER_DISPATCH", "") != "1":  # =1 keeps Flower's own (for comparisons)
        from simulations.fast_dispatch import install
        install()
    if ray_address:
        log.info("starting Flower simulation: %d clients on the Ray cluster at %s (one ClientApp worker per CPU "
                 "of its nodes)", num_clients, ray_address)
    else:
        log.info("starting Flower simulation: %d clients on %d CPUs", num_clients, cpus)
    out = Path(cfg.output_dir) / cfg.experiment_name
    with EngineWatch(startup_timeout, out, ray_address=ray_address) as watch:
        try:
            _run_simulation(
                num_supernodes=num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                backend_name="ray", backend_config=backend, client_app_attr="clients.client_app:app",
                server_app_attr="server.server_app:app", server_app_context=context, app_dir=str(APP_DIR),
                run=run, verbose_logging=verbose, is_app=True)
        except Exception:
            if watch.engine_error is not None:  # the ServerApp thread may wait for replies forever: exit
                err = watch.engine_error
                cause = f"{type(err).__name__}: {err}" + (f" <- {type(err.__cause__).__name__}: {err.__cause__}"
                                                          if err.__cause__ is not None else "")
                watch.fail(f"the simulation engine {'failed while starting' if watch.answered is None else 'crashed'}"
                           f" ({cause})", started=watch.answered is not None)
            raise
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without a summary in {out}; see {out / 'run.log'}")
    return out


class EngineWatch:
    """A watchdog on the simulation engine's start-up, so that an engine that never comes up
    ends the run with a message and exit code 3 instead of a hang.

    Why it is needed: Flower runs the ServerApp in a (non-daemon) thread and the engine in the
    main thread. When Ray does not start (on a loaded machine it may miss its own 30 s), the
    engine raises while the ServerApp waits, without a timeout, for its first replies; the
    process then never exits. When Ray hangs instead, nothing happens at all.

    The engine counts as up once a ClientApp has answered its first message. Two clocks, each
    ``timeout`` seconds: from the start of the simulation until the engine's worker threads
    start (Ray initialised and the ClientApp actors requested), and from the first message a
    worker takes until the first reply (the actors' processes started and loaded the
    ClientApp). The ServerApp's own start-up (the teacher, which may train for minutes) is on
    neither clock. Hooks wrap ``vce_api.worker`` and ``vce.start_vce`` (flwr 1.41) for the
    duration of one run and are removed afterwards.
    """

    def __init__(self, timeout: float, out: Path, *, ray_address: str | None = None) -> None:
        self.timeout, self.out, self.ray_address = float(timeout), out, ray_address
        self.t0 = time.monotonic()
        self.built: float | None = None     # the engine's first worker thread started
        self.taken: float | None = None     # a worker took the first message
        self.answered: float | None = None  # the first reply came back
        self.engine_error: BaseException | None = None
        self._done = threading.Event()
        self._restore: list = []

    def __enter__(self) -> EngineWatch:
        from flwr.server.superlink.fleet import vce
        from flwr.server.superlink.fleet.vce import vce_api

        watch, worker, start_vce = self, vce_api.worker, vce.start_vce

        def watched_worker(inbox, outbox, *args, **kwargs):
            if watch.built is None:
                watch.built = time.monotonic()
            return worker(_Taking(inbox, watch), _Answering(outbox, watch), *args, **kwargs)

        def watched_start_vce(*args, **kwargs):
            try:
                return start_vce(*args, **kwargs)
            except BaseException as exc:
                watch.engine_error = exc
                raise

        self._restore = [(vce_api, "worker", worker), (vce, "start_vce", start_vce)]
        vce_api.worker, vce.start_vce = watched_worker, watched_start_vce
        if self.timeout > 0:
            threading.Thread(target=self._watch, name="fedkd-engine-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for module, name, original in self._restore:
            setattr(module, name, original)

    def _watch(self) -> None:
        while not self._done.wait(0.25):
            if self.answered is not None:
                return
            now = time.monotonic()
            if self.built is None and now - self.t0 > self.timeout:
                self.fail(f"the simulation engine did not come up: Ray had not started its workers after "
                          f"{self.timeout:.0f} s")
            if self.taken is not None and now - self.taken > self.timeout:
                self.fail(f"the simulation engine did not come up: no ClientApp answered its first message "
                          f"within {self.timeout:.0f} s")

    def fail(self, what: str, *, started: bool = False) -> None:
        """Say what happened, stop the engine's processes, and end this process (exit code 3).

        ``os._exit``: the ServerApp thread is blocked waiting for replies that will never come,
        and a normal exit would wait for it forever.
        """
        if started:
            msg = f"{what}. The rounds so far are in {self.out} (run.log; `--resume` continues after a checkpoint)"
        else:
            where = (f"The Ray cluster at {self.ray_address} may be down, overloaded, or run another Ray or Python "
                     f"version (`ray status --address {self.ray_address}`): check it, then run the command again or "
                     f"give --startup-timeout more seconds (0 waits forever)."
                     if self.ray_address else
                     "The machine may be overloaded: run the command again, give --startup-timeout more seconds "
                     "(0 waits forever) or fewer --num-cpus.")
            msg = f"{what} (--startup-timeout {self.timeout:g}). {where} Nothing was trained; the log so far is in " \
                  f"{self.out / 'run.log'}"
        logging.getLogger("fedkd").error("%s", msg)
        print(f"fedkd: error: {msg}", file=sys.stderr, flush=True)
        from fedkd.processes import descendants
        for pid in descendants([os.getpid()]):  # Ray's GCS, raylet and workers: started by this process
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        sys.stdout.flush()
        os._exit(ENGINE_FAILED_EXIT)


class _Taking:
    """The engine's inbox, noting when a worker first takes a message."""

    def __init__(self, queue, watch: EngineWatch) -> None:
        self.queue, self.watch = queue, watch

    def get(self, *args, **kwargs):
        msg = self.queue.get(*args, **kwargs)
        if self.watch.taken is None:
            self.watch.taken = time.monotonic()
        return msg

    def __getattr__(self, name):
        return getattr(self.queue, name)


class _Answering:
    """The engine's outbox, noting the first reply."""

    def __init__(self, queue, watch: EngineWatch) -> None:
        self.queue, self.watch = queue, watch

    def put(self, *args, **kwargs):
        if self.watch.answered is None:
            self.watch.answered = time.monotonic()
        return self.queue.put(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.queue, name)
