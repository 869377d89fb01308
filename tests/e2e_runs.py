"""Real runs through the CLI, shared by the end-to-end tests (see conftest.py).

Every ``fedkd run`` in a test costs a Python start, Flower's imports and a Ray start: tens of
seconds on 2 cores, for runs whose rounds take a few. So the golden cases (tests/test_golden.py)
are the runs most end-to-end tests inspect: a test that needs "a finished default run" or "a
run of the logit protocol" reads the golden case's results folder instead of running its own.

Each run gets one ClientApp worker (``--num-cpus 1``) unless a test needs more: every client
still runs in a real Ray actor, the results are the same for any number of workers (the
golden cases pin them), and a second worker costs a Python process that imports torch and
Flower and then competes with the first for the same two cores (about a fifth of a run's CPU
time).
Tests that need two workers at once (a client that hangs while the others answer; the
deployment comparison) ask for them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"synthetic-users": 50, "synthetic-items": 80, "num-rounds": 2, "teacher-epochs": 2, "progress": False,
        # the server settings the golden files were written with (the defaults before issue 21's)
        "server-optimizer": "fedavg", "server-lr": 1.0, "server-lr-schedule": "constant", "kd-schedule": "constant",
        # the handshake asks 5 nodes and places the others by the engine's registration order
        # (a fifth of a run's start-up when all 40 were asked, on 2 cores): the golden files,
        # written when every node was asked, do not change
        "handshake": "registration-order", "handshake-verify": 5}
CASES: dict[str, dict] = {
    "default": {},
    # a mixed fleet: a device trace (tests/data/mixed-trace.csv: even clients weak, 0.1x speed,
    # 0.01 MB; client 0 online from round 2, client 1 never) decides tiers and who is online;
    # weak devices train a width-4 slice and fit fewer steps under the deadline; aggregated with
    # the coordinate-wise trimmed mean, ring by ring of the nested widths
    "nested-deadline": {"student-widths": "4,16", "device-trace": str(ROOT / "tests" / "data" / "mixed-trace.csv"),
                        "tier-steps": "16,16", "round-deadline": 0.6, "min-steps": 2, "aggregation": "trimmed-mean"},
    "secagg": {"secure-aggregation": True, "clients-per-round": 10},
    # 5 refinement steps a round, 2 rounds (20 and 3 until 2026-12-01: 60 steps of the teacher
    # on the server took 50 of the suite's seconds and pinned nothing more)
    "logits-refine": {"protocol": "logits", "teacher-refine-steps": 5, "teacher-refine-lr": 0.01},
    "faults-norm-bound": {"fault-crash": 0.2, "fault-corrupt": 0.15, "fault-malicious": "3", "norm-bound": 3.0,
                          "num-rounds": 3},
    "central-dp": {"dp-mode": "central", "dp-noise-multiplier": 1.0, "dp-clip-norm": 0.5,
                   "clients-per-round": 10, "num-rounds": 3},
}

# The small run every other way of starting the app is held to (`flwr run .`, a Ray cluster,
# the Deployment Engine): 50 synthetic users, 20% in the cloud, 40 edge users in exactly 3
# clients (users-per-client 14), 2 rounds, validated once on one client, the current server
# defaults. Three clients make three messages a round: the engine's paths are exercised at a
# tenth of a golden case's cost. One torch thread everywhere (``ONE_THREAD``): a deployment
# trains its teacher in the ServerApp process, and another thread count changes float sums
# (docs/devices.md, "Deployment vs simulation").
SMALL = {"synthetic-users": 50, "synthetic-items": 80, "num-rounds": 2, "teacher-epochs": 2, "eval-every": 2,
         "val-clients": 1, "progress": False}
SMALL_SIM = {**SMALL, "users-per-client": 14}  # what a deployment's shards decide, given to a simulation
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class Run:
    """A finished run: its results folder and what the command printed."""

    out: Path
    stdout: str
    stderr: str


def cli_args(flat: dict) -> list[str]:
    """Flat config keys as `fedkd run` options."""
    args = []
    for k, v in flat.items():
        args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return args


WORKERS = 1  # ClientApp workers of a test run (see above)


def run_command(name: str, out: Path, cache: Path, flat: dict, *, num_cpus: int = WORKERS,
                ray_address: str | None = None) -> list[str]:
    """`fedkd run` of the experiment ``name`` with the flat config keys ``flat``; with
    ``ray_address``, on that Ray cluster (whose nodes' CPUs decide the workers) instead."""
    engine = ["--ray-address", ray_address] if ray_address else ["--num-cpus", str(num_cpus)]
    return [sys.executable, "-m", "simulations.cli", "run", *engine, "--experiment-name", name,
            "--output-dir", str(out), "--cache-dir", str(cache), *cli_args(flat)]


def run_case(name: str, out: Path, cache: Path, *, flat: dict | None = None, timeout: float = 900,
             num_cpus: int = WORKERS, ray_address: str | None = None, env: dict | None = None) -> Run:
    """One experiment through the CLI, as a user runs it, in its own process group so that a
    hang can be killed with its Ray processes. ``flat`` defaults to the golden case ``name``."""
    flat = {**BASE, **CASES[name]} if flat is None else flat
    cmd = run_command(name, out, cache, flat, num_cpus=num_cpus, ray_address=ray_address)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:  # minutes on a busy 2-core machine, well under one when idle
        stdout, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise RuntimeError(f"run {name} timed out: {err[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed: {err[-4000:]}")
    return Run(out / name, stdout, err)


def kill_after_round_2(out: Path, cache: Path, name: str, flat: dict) -> None:
    """Start the run, SIGKILL it (with its Ray processes) once round 2 is written; it must not
    have finished. Round 3 may be in the results or not, as a real kill falls. A results folder
    already there (an earlier run, which the new one moves aside) is not the run's own."""
    folder = out / name
    earlier = folder.stat().st_ino if folder.exists() else None
    proc = subprocess.Popen(run_command(name, out, cache, flat), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    timing = out / name / "timing.csv"
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:  # wait for round 2 to be written, then kill
            try:
                if folder.stat().st_ino != earlier and timing.read_text().count("\n") >= 3:  # header + 2 rounds
                    break
            except FileNotFoundError:  # not yet created (or being moved aside)
                pass
            time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"run {name} ended before it could be killed (exit {proc.returncode})")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Ray processes and its ClientApp workers
        proc.wait()
    killed_rows = (out / name / "metrics.csv").read_text().count("\n") - 1
    if not (2 <= killed_rows <= 3 and not (out / name / "summary.json").exists()):
        raise RuntimeError(f"run {name} killed with {killed_rows} rounds written or a summary: not mid-run")
