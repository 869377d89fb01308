"""One long-lived ClientApp process per SuperNode: import once, keep the device's data.

    flower-supernode ... --isolation process --port 9094     # the SuperNode starts no ClientApp itself
    python -m simulations.clientapp_worker --runtime-api-address 127.0.0.1:9094 --parent-pid <its pid>

By default (``--isolation subprocess``) a flwr 1.41 SuperNode starts ``flower-superexec``, which
asks the SuperNode's Runtime API for a task every second and starts a new ``flwr-clientapp``
process for each one: it imports Flower, installs the run's FAB, imports the app (torch,
pandas, fedkd), fedkd rebuilds the population from the interaction file, the process handles
one message and exits. With ``--isolation process`` the SuperNode starts nothing and waits
for a process of its own choosing to claim its tasks. This worker is that process, and it
stays: it claims tasks (Flower's ``AcquireTask``; 0.05 s after a task, then less often while
none comes, at most every 0.5 s) and runs each as ``flwr-clientapp`` does, with Flower's own
functions (``pull_task_input``, the ``ClientApp`` call, ``push_message``, ``push_task_output``,
the task heartbeat, the same error reply when the app raises), but in this process. The
imports, the loaded app and fedkd's per-process caches (config, population, this device's
partition: ``fedkd.population``, ``fedkd.edge``, keyed by the config and the data file's
identity) then outlive the message, as they do in the simulation engine's long-lived
workers. Node state (``context.state``) stays with the SuperNode, which hands it over with
every task, as before.

The app is loaded once, from the FAB of the first task (installed under ``FLWR_HOME`` like
``flwr-clientapp`` installs it), and serves every task of that FAB. A task of another FAB
(another version of the app) goes to a fresh ``flwr-clientapp`` process, Flower's own path:
Python cannot unload the first app's modules. For the same reason this module imports
nothing of fedkd: the app's modules come from the FAB alone. Under another flwr version than
:data:`FLWR_VERSION` every task goes to ``flwr-clientapp`` (the worker then only does what
``flower-superexec`` does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from logging import ERROR
from pathlib import Path

FLWR_VERSION = "1.41.0"  # the flwr-clientapp steps below were read from this version's run_clientapp.py
PRELOAD = ("numpy", "pandas", "torch")  # the app's heavy third-party modules (--preload: before the first task)
# Flower's retries of an object not there yet (its own: after 1 s, doubling to 10 s, 500 tries); = wire.waits
INITIAL_BACKOFF, BACKOFF_CAP = 0.05, 0.5
FLOWER_BACKOFF_CAP, FLOWER_TRIES = 10.0, 500
TASK_START_ENV = "FEDKD_TASK_START"  # = fedkd.usage.TASK_START_ENV: when this worker claimed the current task
POLL, POLL_CAP = 0.05, 0.5  # seconds between claims: after a task, and at most (flower-superexec: 1 s, fixed)


def flower_exe(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


class Worker:
    """Claims a SuperNode's ClientApp tasks and runs them in this process."""

    def __init__(self, runtime_api_address: str, *, insecure: bool = True, root_certificates: str | None = None,
                 poll: float = POLL, poll_cap: float = POLL_CAP,
                 launch: Callable[[list[str]], object] = subprocess.Popen) -> None:
        self.address, self.insecure, self.root_certificates = runtime_api_address, insecure, root_certificates
        self.poll, self.poll_cap, self.launch = poll, max(poll, poll_cap), launch
        self.app = None  # the ClientApp of the FAB below, once loaded
        self.fab_hash: str | None = None
        self.handled = self.handed_off = 0
        self.warm = False  # torch's optimiser machinery loaded (warm_up)
        self._acquirer = None
        import flwr
        self.in_process = getattr(flwr, "__version__", "") == FLWR_VERSION  # else Flower's flwr-clientapp

    # ---- plumbing (Flower's Runtime API client, as flower-superexec and flwr-clientapp build it)
    def _client(self, component: str, token: str | None = None):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        interceptors = [RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure,
            root_certificates=validate_and_resolve_root_certificates(self.root_certificates, self.insecure),
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())

    def acquire(self):
        """(token, task) of the oldest pending ClientApp task of the SuperNode, or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType
        if self._acquirer is None:
            self._acquirer = self._client("SuperExec")
        res = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return (res.token, res.task) if res.HasField("task") and res.token else None

    # ---- the loop
    def serve(self, *, max_tasks: int | None = None) -> None:
        """Claim and run tasks until interrupted (or ``max_tasks`` have been taken). After a task
        the next claim comes ``poll`` seconds later; each time there was none, twice as late, up
        to ``poll_cap``: messages come in bursts (an exchange, then validation), and an idle
        worker should cost its SuperNode little."""
        taken, wait = 0, self.poll
        while max_tasks is None or taken < max_tasks:
            got = self.acquire()
            if got is None:
                time.sleep(wait)
                wait = min(2 * wait, self.poll_cap)
                continue
            token, task = got
            taken, wait = taken + 1, self.poll
            other_app = self.fab_hash is not None and task.fab_hash and task.fab_hash != self.fab_hash
            if other_app or not self.in_process:
                self.hand_off(token)
            else:
                self.run_task(token)
                self.warm_up()

    def warm_up(self) -> None:
        """Once the app has imported torch (its first task, the handshake), take one optimiser step
        on a 2-number model, between messages: torch loads the machinery of its optimisers
        (torch._dynamo, sympy: ~800 modules, 1.5 s on a loaded 2-core machine) at the first
        step, which would otherwise land in the first training round. Until a task comes, the
        worker imports nothing (``--preload`` to import at start)."""
        if not self.warm and "torch" in sys.modules:
            _first_step()
            self.warm = True

    def hand_off(self, token: str) -> None:
        """A task of another app: a fresh ``flwr-clientapp`` process, as Flower's SubprocessExecutor starts it."""
        args = [flower_exe("flwr-clientapp"), "--runtime-api-address", self.address, "--token", token]
        args += ["--insecure"] if self.insecure else (
            ["--root-certificates", self.root_certificates] if self.root_certificates else [])
        self.launch([*args, "--parent-pid", str(os.getpid())])
        self.handed_off += 1

    def run_task(self, token: str) -> None:
        """One task, as ``flwr.supernode.runtime.run_clientapp`` runs it, without leaving the process."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        claimed = time.time()
        client = self._client("flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            pulled = time.time()
            app = self._load(run, fab)
            record(message_id=message.metadata.message_id, claimed=claimed, input_pulled=pulled,
                   app_ready=time.time())
            os.environ[TASK_START_ENV] = repr(claimed)  # fedkd.usage: the message's cost counts from here
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught  (Flower's own handling, verbatim)
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, \
                    "An exception was raised when attempting to load `ClientApp`"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log(ERROR, "Failed to push reply message", exc_info=ex)
            # Stop the heartbeat first: one sent after the task is finished is refused, and a
            # refused heartbeat makes Flower's sender interrupt the whole process.
            heartbeat.stop()
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()
            self.handled += 1

    def _load(self, run, fab):
        """The app of this FAB: installed and imported at the first task, then kept."""
        if self.app is None:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.app = load(run.fab_id, run.fab_version, fab.hash_str)
            self.fab_hash = fab.hash_str
        return self.app


def shorten_object_pulls(initial: float = INITIAL_BACKOFF, cap: float = BACKOFF_CAP) -> bool:
    """``wire.waits.shorten_object_pulls``, for this process: a task is handed out as soon as the
    SuperNode has created it, often before the SuperNode has the message's content, and Flower
    retries after 1 s, 2 s, 4 s ... Kept here because this module imports nothing of the app."""
    import flwr
    from flwr.supercore.inflatable import inflatable_utils
    if getattr(flwr, "__version__", "") != FLWR_VERSION:
        return False
    tries = math.ceil(FLOWER_TRIES * FLOWER_BACKOFF_CAP / cap)  # as patient as Flower
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__.update(initial_backoff=initial, backoff_cap=cap, max_tries_per_object=tries)
    return True


def command(runtime_api_address: str, *, parent_pid: int | None = None) -> list[str]:
    """The command line of a worker for the SuperNode whose Runtime API is ``runtime_api_address``."""
    cmd = [sys.executable, "-m", "simulations.clientapp_worker", "--runtime-api-address", runtime_api_address]
    return cmd + (["--parent-pid", str(parent_pid)] if parent_pid is not None else [])


def record(**fields: object) -> None:
    """``fedkd.timeline.record("worker", ...)``, written here (this module imports nothing of the app):
    one JSON line per task into ``$FEDKD_PROFILE_DIR/worker-<pid>.jsonl``, only when it is set."""
    where = os.environ.get("FEDKD_PROFILE_DIR", "")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        with (Path(where) / f"worker-{os.getpid()}.jsonl").open("a") as f:
            f.write(json.dumps({"role": "worker", "pid": os.getpid(), "event": "task", **fields}, sort_keys=True)
                    + "\n")


def preload(modules: Sequence[str]) -> None:
    """Import the app's heavy third-party modules now, not at the first message (a device that
    boots long before its first message, ``--preload``)."""
    import importlib
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue


def _first_step() -> None:
    import torch
    w = torch.nn.Parameter(torch.zeros(2))  # no random init: the global RNG is left as it was
    for opt in (torch.optim.SGD([w], lr=0.1), torch.optim.Adam([w], lr=0.1)):
        opt.zero_grad()
        (w * torch.ones(2)).sum().backward()
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        opt.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.clientapp_worker", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--root-certificates", default=None,
                   help="CA of a SuperNode whose Runtime API serves TLS (its --ssl-certfile); default: "
                        "plain HTTP, as the Runtime API listens on loopback")
    p.add_argument("--poll", type=float, default=POLL,
                   help="seconds between claims after a task, doubling while there is none (flower-superexec: 1 s)")
    p.add_argument("--poll-cap", type=float, default=POLL_CAP, help="the longest wait between claims")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) is gone")
    p.add_argument("--preload", nargs="*", default=[], metavar="MODULE",
                   help=f"modules to import (and, with torch, warm up) before the first task, e.g. "
                        f"{' '.join(PRELOAD)}; by default the first task imports what the app needs")
    args = p.parse_args(argv)
    if not 0 < args.poll <= args.poll_cap <= 60:
        p.error("need 0 < --poll <= --poll-cap <= 60")
    from flwr.supercore.app_utils import start_parent_process_monitor
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT here once the SuperNode is gone
    shorten_object_pulls()
    try:
        preload(args.preload)
        worker = Worker(args.runtime_api_address, insecure=args.root_certificates is None,
                        root_certificates=args.root_certificates, poll=args.poll, poll_cap=args.poll_cap)
        worker.warm_up()  # with --preload torch: now
        worker.serve()
    except KeyboardInterrupt:  # the SuperNode is gone, or Ctrl-C
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
