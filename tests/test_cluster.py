"""`fedkd run --ray-address`: the simulation on an existing Ray cluster (docs/cluster.md).

The slow test starts a Ray cluster of two nodes on loopback (tests/ray_cluster.py: a head on
127.0.0.2 and a worker node on 127.0.0.3, one CPU each, so each can hold exactly one ClientApp
actor), runs the small experiment on it (``SMALL_SIM`` in tests/e2e_runs.py: 3 clients, 2
rounds) and checks that (a) the results are the single-node run's (``small_sim``, byte for
byte, ``model_digest`` of every round included), (b) the ClientApp actors lived on both nodes
and both nodes handled messages, and (c) nothing of the cluster is left running. The other
tests check the option without any Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import small_teacher
from e2e_runs import ONE_THREAD, ROOT, SMALL_SIM, run_case
from ray_cluster import HEAD_IP, WORKER_IP, LoopbackCluster
from simulations import cluster
from simulations.deploy import free_ports
from test_golden import pinned


@pytest.mark.extended
@pytest.mark.slow
def test_a_run_on_a_two_node_ray_cluster_gives_the_single_node_results(small_sim, tmp_path):
    ray_cluster = LoopbackCluster(head_cpus=1, worker_cpus=1)
    try:
        address = ray_cluster.start()
        nodes = {n["node_id"]: n for n in ray_cluster.query("nodes")}
        run = run_case("small", tmp_path / "out", small_teacher(small_sim, tmp_path / "cache"), flat=SMALL_SIM,
                       ray_address=address, env=ONE_THREAD)
        ran = ray_cluster.query("actors")
    finally:
        left = ray_cluster.stop()
    print(f"cluster {address}: nodes {json.dumps(list(nodes.values()))}")
    print(f"ClientApp actors: {json.dumps(ran['actors'])}")
    print(f"ClientAppActor.run calls by node: {json.dumps(ran['runs_by_node'])}")
    print(run.stderr[-3000:])
    assert not left, f"processes of the test cluster still alive: {left}"

    assert f"on the Ray cluster at {address}" in run.stderr
    assert pinned(run.out) == pinned(small_sim.out)  # model_digest of every round included

    # one actor per CPU: one on the head, one on the worker node, and both took messages
    assert sorted(a["node_id"] for a in ran["actors"]) == sorted(nodes)
    assert sorted(a["ip"] for a in ran["actors"]) == [HEAD_IP, WORKER_IP]
    assert set(ran["runs_by_node"]) == set(nodes) and all(n > 0 for n in ran["runs_by_node"].values())


# --------------------------------------------------------------------------- the option, without Ray
@pytest.mark.parametrize("text, expected", [("127.0.0.1:6379", ("127.0.0.1", 6379)),
                                            ("head.lan:40123", ("head.lan", 40123)),
                                            ("[::1]:6379", ("::1", 6379))])
def test_an_address_is_host_and_port(text, expected):
    assert cluster.parse_address(text) == expected


@pytest.mark.parametrize("text, says", [("127.0.0.1", "is not HOST:PORT"), ("head:port", "is not HOST:PORT"),
                                        ("head:0", "is not HOST:PORT"), (":6379", "is not HOST:PORT"),
                                        ("auto", "give the head node's HOST:PORT"),
                                        ("ray://head:10001", "Ray Client (ray://) addresses are not supported")])
def test_other_addresses_are_refused_with_what_to_give(text, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        cluster.parse_address(text)


def test_the_backend_config_attaches_instead_of_sizing_a_ray_of_its_own():
    local = cluster.backend_config(num_cpus=3, ray_address=None)
    attached = cluster.backend_config(num_cpus=3, ray_address="10.0.0.5:6379")
    assert local["init_args"]["num_cpus"] == 3 and "address" not in local["init_args"]
    # ray.init refuses num_cpus/num_gpus when it attaches to a cluster
    assert attached["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in attached["init_args"] and "num_gpus" not in attached["init_args"]
    assert attached["client_resources"] == local["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_a_local_run_drops_ray_address_from_its_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")  # ray.init() with no address would attach to it
    assert cluster.drop_address_env() == "10.0.0.9:6379"
    assert "RAY_ADDRESS" not in os.environ
    assert cluster.drop_address_env() is None


def _fedkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_an_address_where_nothing_answers_is_refused_before_the_engine_starts(tmp_path):
    (port,) = free_ports(1)  # free now: nothing listens there
    proc = _fedkd("run", "--ray-address", f"127.0.0.1:{port}", "--synthetic-users", "50",
                  "--output-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (Connection refused)" in proc.stderr
    assert "starting Flower simulation" not in proc.stderr + proc.stdout
    assert not any(tmp_path.iterdir())  # nothing written


def test_num_cpus_and_ray_address_exclude_each_other():
    from simulations.runner import run_experiment

    with pytest.raises(ValueError, match="--num-cpus and --ray-address exclude each other"):
        run_experiment({}, num_cpus=2, ray_address="127.0.0.1:6379")


def test_help_explains_the_option():
    from simulations.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(sub.format_help().split())
    assert "--ray-address HOST:PORT" in text and "docs/cluster.md" in text and "Excludes --num-cpus" in text
