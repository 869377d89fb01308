"""`flwr run .`, the way a Flower user runs the app: Flower's own CLI starts its local SuperLink
(simulation mode, with its SuperExec and a `flwr-simulation` process that hosts the ServerApp),
and leaves them running afterwards.

One real run of the small experiment (``SMALL_SIM`` in tests/e2e_runs.py: 3 clients, 2 rounds)
for three claims: every end-of-run step of `fedkd run` (the membership attack, the references,
the reconstruction attack) also runs under Flower's engine; the results are those of the same
experiment through `fedkd run` (``small_sim``), byte for byte (the same seed gives the same
run whichever way it is started); and `fedkd stop` on the results folder stops exactly the
Flower processes the run recorded, by PID, with none left behind.

The SuperLink gets ports of its own (Flower reads them from the environment) and its own
FLWR_HOME, so a SuperLink of the user's is neither reused nor touched.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_teacher
from e2e_runs import ONE_THREAD, ROOT, SMALL_SIM
from fedkd import processes
from test_golden import pinned

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flwr_run(small_sim, tmp_path_factory):
    """The small experiment through `flwr run . --stream`, its teacher loaded from a copy of
    ``small_sim``'s cache. Whatever the test asserts, the processes it recorded are stopped at
    the end."""
    tmp = tmp_path_factory.mktemp("flwr-run")
    cache = small_teacher(small_sim, tmp / "cache")
    conf = {**SMALL_SIM, "experiment-name": "small", "output-dir": str(tmp / "out"), "cache-dir": str(cache)}
    run_config = tmp / "run.toml"
    run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in conf.items()))
    env = {**ONE_THREAD, "FLWR_HOME": str(tmp / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    cmd = [flwr, "run", ".", "--stream", "--federation-config", "num-supernodes=3", "--run-config", str(run_config)]
    out = tmp / "out" / "small"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        yield proc, out
    finally:
        if (out / processes.FILE).is_file():
            processes.stop(out, out=lambda _: None)


def test_flwr_run_gives_the_results_of_fedkd_run_with_every_end_of_run_step(flwr_run, small_sim):
    proc, out = flwr_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["mia_auc"] <= 1.0 and summary["membership_attack"]["members"] == 40
    assert set(summary["references"]) == {"teacher", "popularity"}
    assert summary["reconstruction_attack"]
    assert summary["teacher"]["cached"] is True  # small_sim's teacher, so the run is small_sim's
    assert summary["clients"] == 3
    assert pinned(out) == pinned(small_sim.out)  # model_digest of every round included


def test_fedkd_stop_stops_exactly_the_recorded_flower_processes(flwr_run):
    proc, out = flwr_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = processes.read(out)
    names = {name for _, _, name in rec["parsed"]}
    assert {"flower-superlink", "flower-superexec"} <= names  # Flower left its local SuperLink running
    live = [(pid, start) for pid, start, _ in rec["parsed"] if processes.same_process(pid, start)]
    assert any(processes.same_process(pid, start) for pid, start, name in rec["parsed"]
               if name == "flower-superlink")
    tree = processes.descendants([pid for pid, _ in live]) | {pid for pid, _ in live}
    # a bystander that `pkill -f flower-superlink` would kill: its command line names Flower's SuperLink
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "flower-superlink"])
    try:
        stop = subprocess.run([sys.executable, "-m", "simulations.cli", "stop", str(out), "--grace", "5"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "stopping PID" in stop.stdout and "still alive" not in stop.stdout
        assert not [pid for pid in tree if processes.alive(pid)]  # the recorded processes and all they started
        assert decoy.poll() is None  # and nothing else
    finally:
        decoy.kill()
        decoy.wait()
