"""A Ray cluster of two nodes on loopback for tests/test_cluster.py, and what ran where on it.

The head node and the worker node are two `ray start` runs with their own raylet, CPUs and
ports and its own loopback address, as on two machines; only the host is shared. Every port is explicit (free
ones picked at start; worker processes get ports from the OS), the temporary folder is the
cluster's own, and every process the cluster starts carries ``FEDKD_TEST_RAY_CLUSTER=<id>``
in its environment: :meth:`LoopbackCluster.stop` signals exactly those by PID, never by name
(`ray stop` would stop every Ray instance on the machine, other users' included).

``python tests/ray_cluster.py nodes|actors ADDRESS`` (run by the test, as a Ray driver of its
own) prints the cluster's alive nodes, or the ClientApp actors with the node each lived on
and how many messages each node's actors handled, as JSON. The actor and task tables are
read with ``ray._private.state`` (Ray's debugging accessors, 2.55): there is no public
reader of them without Ray's dashboard, which these nodes do not start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
MARKER = "FEDKD_TEST_RAY_CLUSTER"
# Two loopback addresses, one per node, as two machines have two. Not 127.0.0.1: Ray replaces
# exactly "127.0.0.1", "::1" and "localhost" with the machine's outward address
# (`ray._private.services.resolve_ip_for_localhost`), in --address and --node-ip-address alike;
# any other 127.x.y.z is kept, and Linux routes all of 127.0.0.0/8 to the loopback interface.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
HERE = Path(__file__).resolve()


class LoopbackCluster:
    """Head node (HEAD_IP) with ``head_cpus`` CPUs plus one worker node (WORKER_IP) with ``worker_cpus``."""

    def __init__(self, *, head_cpus: int = 1, worker_cpus: int = 1) -> None:
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.id = uuid.uuid4().hex
        # /tmp/fedkd-ray-XXXX: Ray's socket paths under it must stay within 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fedkd-ray-", dir="/tmp"))
        self.env = {**os.environ, MARKER: self.id, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.address = ""
        self.log: list[str] = []

    def _node_args(self, ip: str, ports: list[int]) -> list[str]:
        names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
        args = [a for name, port in zip(names, ports, strict=True) for a in (name, str(port))]
        return [*args, "--node-ip-address", ip, "--temp-dir", str(self.temp_dir / ip),
                "--min-worker-port", "0", "--max-worker-port", "0",  # 0: each worker gets a free port from the OS
                "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]

    def _ray(self, *args: str) -> None:
        proc = subprocess.run([*RAY, *args], env=self.env, capture_output=True, text=True, timeout=180)
        self.log.append(f"$ ray {' '.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        if proc.returncode != 0:
            raise RuntimeError(f"ray {args[:2]} failed ({proc.returncode}):\n{self.log[-1]}")

    def start(self) -> str:
        """Start both nodes and wait until the cluster has both; return the head's ``HOST:PORT``."""
        from simulations.deploy import free_ports

        gcs, client, *ports = free_ports(14)
        self.address = f"{HEAD_IP}:{gcs}"
        self._ray("start", "--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                  "--include-dashboard", "false", "--num-cpus", str(self.head_cpus),
                  *self._node_args(HEAD_IP, ports[:6]))
        self._ray("start", "--address", self.address, "--num-cpus", str(self.worker_cpus),
                  *self._node_args(WORKER_IP, ports[6:]))
        nodes = self.query("nodes")
        if len(nodes) != 2:
            raise RuntimeError(f"the cluster at {self.address} has {len(nodes)} node(s), not 2: {nodes}")
        return self.address

    def query(self, what: str):
        """``nodes`` or ``actors`` (see the module's docstring), read by a driver of its own."""
        proc = subprocess.run([sys.executable, str(HERE), what, self.address], env=self.env, capture_output=True,
                              text=True, timeout=180, cwd=HERE.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"reading {what} of the cluster failed: {proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def processes(self) -> set[int]:
        from fedkd.processes import with_env

        return with_env(MARKER, self.id)

    def stop(self, grace: float = 10.0) -> set[int]:
        """SIGTERM to every process of the cluster, SIGKILL to what is left after ``grace``
        seconds; remove the temporary folder. Returns the PIDs still alive (none, normally)."""
        from fedkd.processes import descendants

        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            pids = self.processes()
            pids |= descendants(pids)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.processes():
                break
        left = self.processes()
        if not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


# --------------------------------------------------------------------------- a driver's view
def _nodes(wanted: int = 2, timeout: float = 60.0) -> list[dict]:
    """The alive nodes (id, CPUs, head or not), once ``wanted`` of them have joined."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= wanted or time.monotonic() > deadline:
            return [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0),
                     "head": "node:__internal_head__" in n["Resources"]} for n in alive]
        time.sleep(0.5)


def _actors() -> dict:
    """Every ClientApp actor the cluster ran (with the node it was placed on) and, from Ray's task
    events, how many ``ClientAppActor.run`` calls (one per message) each node executed."""
    from ray._private import state
    from ray.core.generated import gcs_pb2

    actors = [{"actor_id": a["ActorID"], "node_id": a["Address"]["NodeID"], "ip": a["Address"]["IPAddress"],
               "pid": a["Pid"], "state": a["State"]}
              for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"]
    names, where = {}, {}
    for raw in state.state._connect_and_get_accessor().get_task_events():
        ev = gcs_pb2.TaskEvents.FromString(raw)
        key = (ev.task_id, ev.attempt_number)
        if ev.HasField("task_info") and ev.task_info.func_or_class_name:
            names[key] = ev.task_info.func_or_class_name
        if ev.HasField("state_updates") and ev.state_updates.node_id:
            where[key] = ev.state_updates.node_id.hex()
    runs: dict[str, int] = {}
    for key, node in where.items():
        if names.get(key, "").endswith("ClientAppActor.run"):
            runs[node] = runs.get(node, 0) + 1
    return {"actors": actors, "runs_by_node": runs}


if __name__ == "__main__":
    import ray

    what, address = sys.argv[1], sys.argv[2]
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        print(json.dumps(_nodes() if what == "nodes" else _actors()))
    finally:
        ray.shutdown()
