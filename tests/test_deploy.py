"""`fedkd deploy`: certificates, commands, and real runs on Flower's Deployment Engine.

The slow tests start real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1
and check that every process a deployment started is gone afterwards.
"""

import argparse
import csv
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from e2e_runs import ONE_THREAD, SMALL, cli_args
from simulations import deploy
from simulations.deploy import CertPaths, LocalFleet

ROOT = Path(__file__).resolve().parents[1]
# The small experiment (tests/e2e_runs.py): 50 synthetic users, 20% in the cloud: 40 edge users,
# users-per-client 14 -> exactly 3 clients. Validated once, on one client (the last round;
# val-clients 1): a deployment starts a Python process per message a SuperNode receives
# (`flwr-clientapp`, importing torch and Flower), so fewer messages is a shorter run.
TINY = cli_args(SMALL)
ENV = ONE_THREAD  # see SMALL's comment


def _fleet_processes(state: Path) -> list[str]:
    """Live processes whose FLWR_HOME lies in a deployment's state folder (all it started)."""
    needle = f"FLWR_HOME={state}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in env and deploy.alive(int(d.name)):
            out.append(f"{d.name}: {cmd}")
    return out


def _deploy_cmd(tmp: Path, name: str, *extra: str, nodes: int = 3) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "deploy", "local", "--nodes", str(nodes),
            "--state-dir", str(tmp / "state"), "--experiment-name", name, "--output-dir", str(tmp / "out"),
            "--cache-dir", str(tmp / "cache-deploy"), "--timeout", "480", *TINY, *extra]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


# ------------------------------------------------------------------------------- fast: certificates
def test_certs_ca_signs_a_server_cert_for_loopback_and_node_keys_load_in_flower(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    paths = deploy.make_certs(tmp_path / "c", nodes=2, hosts=["192.0.2.7", "link.example"])
    for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key,
              paths.node_key(0), paths.node_pub(0), paths.node_key(1), paths.node_pub(1)):
        assert p.is_file(), p
    for secret in (paths.ca_key, paths.server_key, paths.node_key(0)):
        assert secret.stat().st_mode & 0o077 == 0, f"{secret} readable by others"
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips and ipaddress.ip_address("192.0.2.7") in ips
    assert {"localhost", "link.example"} <= set(san.get_values_for_type(x509.DNSName))
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    # Flower's own loaders accept the keys: `flwr supernode register` and `flower-supernode`
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
    private, public = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(paths.node_key(1)), auth_supernode_public_key=None))
    assert isinstance(private.curve, ec.SECP384R1)
    assert try_load_public_key(paths.node_pub(1)) == public_key_to_bytes(public)
    assert try_load_public_key(paths.node_pub(0)) != try_load_public_key(paths.node_pub(1))
    assert CertPaths(paths.root).check(nodes=2) == paths
    with pytest.raises(ValueError, match="fedkd deploy certs --out"):
        CertPaths(paths.root).check(nodes=3)


def test_certs_command_refuses_to_overwrite_and_prints_device_commands(tmp_path, capsys):
    from simulations.cli import main
    assert main(["deploy", "certs", "--out", str(tmp_path / "c"), "--nodes", "2", "--host", "10.0.0.5",
                 "--data-path", "/home/pi/fedkd/u.data"]) == 0
    text = capsys.readouterr().out
    assert "--enable-supernode-auth" in text and "flower-superlink --host 0.0.0.0 --port 8000" in text
    assert "--database superlink.db" in text  # registrations survive a SuperLink restart
    assert text.count("flwr supernode register") == 2
    assert "--superlink 10.0.0.5:8000" in text
    assert "--auth-supernode-private-key /home/pi/fedkd/node-1" in text
    assert "'partition-id=1 num-partitions=2 data-path=\"/home/pi/fedkd/u.data\"'" in text
    assert main(["deploy", "certs", "--out", str(tmp_path / "c"), "--nodes", "2"]) == 2
    assert "--force" in capsys.readouterr().err


# ------------------------------------------------------------------------------- fast: commands
def test_superlink_and_supernode_commands(tmp_path):
    from flwr.common.config import parse_config_args
    certs = CertPaths(tmp_path)
    assert deploy.superlink_command(port=9000) == [
        "flower-superlink", "--host", "127.0.0.1", "--port", "9000", "--insecure",
        "--disable-runtime-dependency-installation"]
    tls = deploy.superlink_command(port=9000, host="0.0.0.0", certs=certs, auth=True)
    assert "--insecure" not in tls and "--enable-supernode-auth" in tls
    assert tls[tls.index("--ssl-ca-certfile") + 1] == str(certs.ca_cert)
    assert tls[tls.index("--ssl-certfile") + 1] == str(certs.server_cert)
    assert tls[tls.index("--ssl-keyfile") + 1] == str(certs.server_key)
    with pytest.raises(ValueError, match="needs TLS"):
        deploy.superlink_command(port=9000, auth=True)
    assert deploy.superlink_command(port=9000, database="s.db")[-3:-1] == ["--database", "s.db"]

    plain = deploy.supernode_command(superlink="127.0.0.1:9000", partition_id=2, num_partitions=3, port=9101)
    assert plain[:4] == ["flower-supernode", "--superlink", "127.0.0.1:9000", "--insecure"]
    assert plain[plain.index("--port") + 1] == "9101"
    secure = deploy.supernode_command(superlink="h:1", partition_id=0, num_partitions=3, root_certificates="ca.crt",
                                      private_key="node-0", data_path="/data/my file.csv")
    assert "--insecure" not in secure and secure[secure.index("--root-certificates") + 1] == "ca.crt"
    assert secure[secure.index("--auth-supernode-private-key") + 1] == "node-0"
    # what flower-supernode makes of the node config (its own parser)
    assert parse_config_args([secure[secure.index("--node-config") + 1]]) == {
        "partition-id": 0, "num-partitions": 3, "data-path": "/data/my file.csv"}


def test_flwr_connection_config_is_read_by_flower(tmp_path):
    from flwr.cli.flower_config import parse_superlink_connection
    conf = tomllib.loads(deploy.connection_toml("127.0.0.1:9000"))
    assert conf["superlink"]["default"] == deploy.CONNECTION
    conn = parse_superlink_connection(conf["superlink"][deploy.CONNECTION], deploy.CONNECTION)
    assert conn.address == "127.0.0.1:9000" and conn.insecure
    conf = tomllib.loads(deploy.connection_toml("h:1", name="x", root_certificates=tmp_path / "ca.crt", default=False))
    conn = parse_superlink_connection(conf["superlink"]["x"], "x")
    assert "default" not in conf["superlink"] and not conn.insecure
    assert conn.root_certificates == str(tmp_path / "ca.crt")
    assert deploy.flwr_run_command(Path("/r.toml"), exe="flwr") == [
        "flwr", "run", str(deploy.APP_DIR), deploy.CONNECTION, "--run-config", "/r.toml", "--stream"]


def test_settings_and_fleet_size():
    assert deploy._parse_pairs('num-rounds=2 local-lr=0.5 progress=false experiment-name="a b"') == {
        "num-rounds": 2, "local-lr": 0.5, "progress": False, "experiment-name": "a b"}
    with pytest.raises(ValueError, match="strings need quotes"):
        deploy._parse_pairs("experiment-name=a-b")
    # defaults: 100 users, 80 at the edge -> 3 clients of 27, 27 and 26
    assert deploy.fit_fleet({}, 3) == {"users-per-client": 27}
    assert deploy.fit_fleet({"synthetic-users": 50}, 3)["users-per-client"] == 14
    assert deploy.fit_fleet({"synthetic-users": 50, "users-per-client": 14}, 3)["users-per-client"] == 14
    with pytest.raises(ValueError, match="make 3 edge clients .* but --nodes is 4"):
        deploy.fit_fleet({"synthetic-users": 50, "users-per-client": 14}, 4)
    assert deploy.fit_fleet({"synthetic-users": 50}, 6)["users-per-client"] == 7  # ceil(40 / 7) = 6
    with pytest.raises(ValueError, match="--nodes is 9"):  # 5 users each make 8 clients, 4 make 10
        deploy.fit_fleet({"synthetic-users": 50}, 9)


def test_deploy_local_refuses_bad_settings_before_starting_anything(tmp_path, capsys):
    from simulations.cli import main
    state = tmp_path / "state"
    assert main(["deploy", "local", "--nodes", "4", "--synthetic-users", "50", "--users-per-client", "14",
                 "--state-dir", str(state)]) == 2
    assert "but --nodes is 4" in capsys.readouterr().err
    assert main(["deploy", "local", "--nodes", "3", "--auth", "--state-dir", str(state)]) == 2
    assert "--auth needs --tls" in capsys.readouterr().err
    assert main(["deploy", "local", "--nodes", "3", "--run-config", "num-round=2"]) == 2
    assert "Unknown config key 'num-round'" in capsys.readouterr().err
    assert main(["deploy", "local", "--nodes", "3", "--weak-node", "3", "--state-dir", str(state)]) == 2
    assert "--weak-node must be a partition id in 0..2" in capsys.readouterr().err
    assert main(["deploy", "local", "--nodes", "3", "--tls", "c", "--auth", "--extra-node", "s",
                 "--state-dir", str(state)]) == 2
    assert "--extra-node with --auth" in capsys.readouterr().err
    assert not state.exists()


def test_node_config_names_a_shard_and_a_usage_log_as_flower_parses_them():
    from flwr.common.config import parse_config_args
    text = deploy.node_config(None, None, shard="/data/my shards/device-2", usage_log="/var/u.jsonl")
    assert parse_config_args([text]) == {"shard": "/data/my shards/device-2", "usage-log": "/var/u.jsonl"}
    cmd = deploy.supernode_command(superlink="h:1", partition_id=2, num_partitions=3, shard="/s/device-2")
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]]) == {
        "partition-id": 2, "num-partitions": 3, "shard": "/s/device-2"}


def test_a_weak_device_runs_on_one_cpu_and_cannot_allocate_past_its_cap():
    weak = deploy.WeakDevice(cpus="0", memory_mb=64)
    probe = ("import os, resource\n"
             "print(sorted(os.sched_getaffinity(0)), resource.getrlimit(resource.RLIMIT_DATA)[0])\n"
             "try:\n    bytearray(200_000_000)\nexcept MemoryError:\n    print('MemoryError')\n")
    cmd = weak.wrap([sys.executable, "-S", "-c", probe])
    assert cmd[:5] == ["taskset", "-c", "0", "prlimit", "--data=64000000"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["[0] 64000000", "MemoryError"], out.stdout + out.stderr
    assert "CPU 0, data memory <= 64 MB" in weak.describe()
    for bad in ({"cpus": "first"}, {"memory_mb": 8}):
        with pytest.raises(ValueError, match="--weak-"):
            deploy.WeakDevice(**bad)


def test_usage_lines_report_each_node_and_mark_the_weak_one():
    report = deploy.device_usage(Path("/nowhere"), ["supernode-0"], {"supernode-0": {"flower-supernode": 150.2}},
                                 weak={"supernode-0": "CPU 0, data memory <= 1000 MB per process"})
    assert report["nodes"][0]["messages"] == 0 and report["nodes"][0]["weak"].startswith("CPU 0")
    report["nodes"][0].update(messages=3, peak_rss_mb=495.3, data_mb=610.0, rounds=[
        {"round": 1, "process_s": 11.94, "handler_s": 3.54, "peak_rss_mb": 494.7},
        {"round": 2, "process_s": 12.06, "handler_s": 3.03, "peak_rss_mb": 495.3}])
    assert deploy.usage_lines(report)[1] == (
        "[fedkd deploy]   supernode-0 [weak: CPU 0, data memory <= 1000 MB per process]: 3 messages, ClientApp peak "
        "RSS 495 MB (data 610 MB); train round 1 11.9 s (handler 3.5 s); round 2 12.1 s (handler 3.0 s); "
        "long-lived: flower-supernode 150 MB")


def test_shard_command_writes_shards_and_the_settings_and_refuses_to_overwrite(tmp_path, capsys):
    from simulations.cli import main
    out = tmp_path / "shards"
    assert main(["shard", "--out", str(out), "--nodes", "3", "--synthetic-users", "50", "--synthetic-items", "80"]) == 0
    text = capsys.readouterr().out
    assert "40 edge users in 3 clients" in text and "fleet fingerprint" in text
    assert sorted(p.name for p in out.iterdir()) == ["device-0", "device-1", "device-2", "run-config.toml"]
    assert tomllib.loads((out / "run-config.toml").read_text())["users-per-client"] == 14
    assert json.loads((out / "device-2" / "manifest.json").read_text())["users"] == 12
    assert main(["shard", "--out", str(out), "--synthetic-users", "50"]) == 2
    assert "--force" in capsys.readouterr().err
    text = deploy.device_commands(superlink="10.0.0.5:8000", nodes=3, certs_dir=None, shards_dir=out)
    assert f"scp -r {out / 'device-1'} pi@device-1:/home/pi/fedkd/shard" in text
    assert "'partition-id=1 num-partitions=3 shard=\"/home/pi/fedkd/shard\"'" in text and "data-path" not in text
    assert f"--run-config {out / 'run-config.toml'}" in text


def test_device_commands_without_tls():
    text = deploy.device_commands(superlink="pi-hub.local:8000", nodes=2, certs_dir=None)
    assert "--insecure" in text and "register" not in text and "scp" not in text
    assert text.count("flower-supernode --superlink pi-hub.local:8000 --insecure") == 2
    with pytest.raises(ValueError, match="HOST:PORT"):
        deploy.device_commands(superlink="pi-hub.local", nodes=1, certs_dir=None)


def test_clientapp_reads_partition_and_device_data_path_from_node_config(tmp_path):
    from flwr.app import Context, RecordDict

    from clients.node import setup
    data = tmp_path / "log.csv"
    data.write_text("user,item,timestamp\n" + "".join(f"{u},{(u * 3 + t) % 7},{t}\n"
                                                      for u in range(10) for t in range(5)))
    run_config = {"data-path": "/server/only/path.csv", "cloud-fraction": 0.2, "users-per-client": 3}

    def ctx(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)

    cfg, client = setup(ctx({"partition-id": 1, "num-partitions": 3, "data-path": str(data)}))
    assert cfg.data_path == str(data) and client.partition_id == 1 and len(client.users) == 3
    with pytest.raises(ValueError, match="no 'partition-id' in its node config.*--node-config"):
        setup(ctx({"data-path": str(data)}))


# ------------------------------------------------------------------------------- slow: real fleets
@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """One deployment for every claim of the tests below: 3 SuperNodes, each from its own shard
    (``--shards``), SuperNode 1 confined as a weak device (one CPU, a data-memory cap), and one
    extra SuperNode whose shard was cut with other settings (cloud-fraction 0.3, the same data),
    which the ServerApp must refuse at the handshake while the run goes on without it."""
    from simulations.cli import main
    tmp = tmp_path_factory.mktemp("loopback")
    assert main(["shard", "--out", str(tmp / "other"), "--synthetic-users", "50", "--synthetic-items", "80",
                 "--cloud-fraction", "0.3", "--users-per-client", "14"]) == 0
    t0 = time.monotonic()
    proc = subprocess.run(_deploy_cmd(tmp, "dep", "--shards", "--weak-node", "1", "--extra-node",
                                      str(tmp / "other" / "device-2")),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    return SimpleNamespace(proc=proc, tmp=tmp, out=tmp / "out" / "dep", state=tmp / "state",
                           seconds=time.monotonic() - t0)


@pytest.mark.slow
def test_deploy_local_three_supernodes_run_two_rounds_then_everything_stops(loopback):
    proc, out = loopback.proc, loopback.out
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Successfully started run" in proc.stdout and "3 SuperNodes online" in proc.stdout
    rows = _rows(out / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(int(r["aggregated"]) == 3 and len(r["model_digest"]) == 16 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clients"] == 3 and summary["clients_trained"] == 3 and summary["rounds"] == 2
    # end-of-run steps run in the ServerApp, so a deployment (`flwr run` against a SuperLink) has them too
    assert 0.0 <= summary["mia_auc"] <= 1.0 and summary["membership_attack"]["members"] == 40
    assert sorted(int(r["partition_id"]) for r in _rows(out / "test_per_client.csv")) == [0, 1, 2]
    assert tomllib.loads((loopback.state / "run-config.toml").read_text())["users-per-client"] == 14
    pids = json.loads((loopback.state / "pids.json").read_text())
    assert {"superlink", "supernode-0", "supernode-1", "supernode-2", "flwr-run"} <= set(pids)
    assert not [n for n, p in pids.items() if deploy.alive(p)]
    assert _fleet_processes(loopback.state) == []
    # `fedkd stop` finds what to stop: the fleet's processes with their start times, and the
    # Flower processes the ServerApp ran under (nearest first, up to the SuperLink of this fleet)
    recorded = json.loads((loopback.state / "processes.json").read_text())["processes"]
    assert {r["name"]: r["pid"] for r in recorded} == {n: p for n, p in pids.items() if n in {r["name"] for r in recorded}}
    assert {"superlink", "supernode-0", "supernode-1", "supernode-2"} <= {r["name"] for r in recorded}
    served = json.loads((out / "processes.json").read_text())["processes"]
    assert [r["name"] for r in served] == ["flwr-serverapp", "flower-superexec", "flower-superlink"]
    assert served[-1]["pid"] == pids["superlink"]
    stop = subprocess.run([sys.executable, "-m", "simulations.cli", "stop", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert stop.returncode == 0 and "nothing to stop" in stop.stdout, stop.stdout + stop.stderr
    print(f"deploy local: {loopback.seconds:.0f}s")


@pytest.mark.slow
def test_supernodes_from_shards_refuse_a_mismatched_device_and_measure_a_weak_one(loopback):
    proc, out, state = loopback.proc, loopback.out, loopback.state
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each SuperNode of the fleet was given its own shard, and nothing else to read
    cmds = {r["name"]: r["cmd"] for r in json.loads((state / "processes.json").read_text())["processes"]}
    for i in range(3):
        assert f'shard="{state / "shards" / f"device-{i}"}"' in cmds[f"supernode-{i}"]
        assert "data-path" not in cmds[f"supernode-{i}"]
    # the extra device (a shard of other settings, claiming partition 2) refused at the handshake, with why
    lines = [json.loads(x) for x in (out / "rejections.jsonl").read_text().splitlines()]
    assert [(ln["round"], ln["type"], ln["partition_id"], ln["reason"]) for ln in lines] == [
        (0, "query", 2, "fingerprint")]
    assert 'cut with {"cloud-fraction":0.3,' in lines[0]["detail"], lines[0]["detail"]
    assert 'this run uses {"cloud-fraction":0.2,' in lines[0]["detail"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nodes_refused"] == 1 and summary["clients"] == 3 and summary["rejected_total"] == 0
    # the weak device took part under its confinement; every node measured itself
    nodes = {n["name"]: n for n in json.loads((out / "device_usage.json").read_text())["nodes"]}
    assert set(nodes) == {"supernode-0", "supernode-1", "supernode-2", "extra-0"}
    weak = nodes["supernode-1"]
    assert weak["weak"] and weak["cpus"] == [0] and weak["memory_limit_mb"] == 1000.0 and weak["errors"] == 0
    assert [r["round"] for r in weak["rounds"]] == [1, 2]
    assert all(r["process_s"] > r["handler_s"] > 0 for r in weak["rounds"])
    assert 0 < weak["peak_rss_mb"] < 1000 and 0 < weak["data_mb"] < 1000
    free = nodes["supernode-0"]
    assert not free["weak"] and free["memory_limit_mb"] is None and free["cpus"] == sorted(os.sched_getaffinity(0))
    assert nodes["extra-0"]["messages"] == 1 and nodes["extra-0"]["rounds"] == []  # the handshake, then nothing
    assert "supernode-1 [weak: CPU 0, data memory <= 1000 MB per process]" in proc.stdout
    print("weak node: ClientApp peak RSS {:.0f} MB (data {:.0f} MB); train {}; long-lived {}".format(
        weak["peak_rss_mb"], weak["data_mb"],
        ", ".join(f"round {r['round']} {r['process_s']:.1f} s (handler {r['handler_s']:.1f} s)" for r in weak["rounds"]),
        weak["processes_peak_rss_mb"]))


@pytest.mark.slow
def test_deployment_and_simulation_give_the_same_model(loopback, small_sim):
    """Same seed and partitions: the global model of every round is bit-identical in both engines
    (``small_sim``: the same experiment through `fedkd run`, one torch thread)."""
    assert loopback.proc.returncode == 0
    dep, simulated = _rows(loopback.out / "metrics.csv"), _rows(small_sim.out / "metrics.csv")
    assert json.loads((small_sim.out / "summary.json").read_text())["clients"] == 3
    print(f"round-1 model_digest: deployment {dep[0]['model_digest']}, simulation {simulated[0]['model_digest']}")
    for d, s in zip(dep, simulated, strict=True):
        assert d["model_digest"] == s["model_digest"]
        assert d["train_loss"] == s["train_loss"] and d["val_ndcg"] == s["val_ndcg"]


@pytest.mark.extended
@pytest.mark.slow
def test_a_supernode_dying_mid_run_fails_the_deployment_and_stops_every_process(tmp_path):
    proc = subprocess.Popen(_deploy_cmd(tmp_path, "dies", nodes=2), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "state" / "run-id").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        victim = json.loads((tmp_path / "state" / "pids.json").read_text())["supernode-1"]
        os.killpg(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "deployment failed: supernode-1 exited with code -9 while the run was going" in stderr
    assert not (tmp_path / "out" / "dies" / "summary.json").exists()
    assert _fleet_processes(tmp_path / "state") == []
    assert "logs kept in" in stdout


@pytest.mark.extended
@pytest.mark.slow
def test_a_run_the_serverapp_fails_exits_nonzero_and_stops_every_process(tmp_path):
    """A value that passes validation but fails in the ServerApp (a cache-dir it cannot create)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(_deploy_cmd(tmp_path, "fails", "--cache-dir", str(blocker / "cache"), nodes=1), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "NotADirectoryError" in proc.stdout  # the ServerApp's traceback, streamed by `flwr run`
    assert "ended as finished:failed" in proc.stderr and "no summary.json written" in proc.stderr
    assert _fleet_processes(tmp_path / "state") == []


@pytest.mark.extended
@pytest.mark.slow
def test_tls_with_auth_admits_a_registered_supernode_and_refuses_an_unregistered_one(tmp_path):
    certs = deploy.make_certs(tmp_path / "certs", nodes=1)
    stranger_pub = deploy.make_node_key(tmp_path / "stranger" / "key")  # never registered
    fleet = LocalFleet(tmp_path / "state", certs=certs, auth=True, out=lambda s: None)
    try:
        fleet.start_superlink()
        assert "registered successfully" in fleet.register(certs.node_pub(0))
        fleet.start_supernode(0, 2, private_key=certs.node_key(0))
        fleet.start_supernode(1, 2, private_key=stranger_pub.with_suffix(""), name="stranger")
        fleet.wait_online(["supernode-0"], timeout=120)
        assert fleet.procs["stranger"].wait(timeout=120) != 0
        refused = fleet.log_path("stranger").read_text()
        assert "Failed to initialize the connection to the SuperLink" in refused
        assert "Failed to activate SuperNode" in refused
        listed = fleet.flwr("supernode", "ls", deploy.CONNECTION, "--format", "json").stdout
        nodes = json.loads(listed[listed.index("{"):])["nodes"]
        assert [n["status"] for n in nodes] == ["online"]  # only the registered one
    finally:
        left = fleet.stop()
    assert left == [] and _fleet_processes(tmp_path / "state") == []
