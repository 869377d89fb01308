"""`fedkd stop DIR`: exactly the recorded processes (and what they started) are stopped, by PID.

Harmless ``sleep`` processes stand in for Flower's SuperLink; the ancestor walk is checked on a
chain of processes renamed (``exec -a``) as Flower's executables.
"""

import json
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedkd import processes
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _sleeper(*cmd: str) -> subprocess.Popen:
    return subprocess.Popen(list(cmd) or ["sleep", "600"], start_new_session=True)


def _gone(proc: subprocess.Popen, timeout: float = 20) -> bool:
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_stop_kills_the_recorded_process_and_its_children_and_nothing_else(tmp_path, capsys):
    parent = _sleeper("sh", "-c", "sleep 600 & sleep 600 & wait")  # a SuperLink with its SuperExecs
    bystander = _sleeper()  # another SuperLink of the user's: not in the file
    try:
        deadline = time.monotonic() + 10
        while len(processes.descendants([parent.pid])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = processes.descendants([parent.pid])
        assert len(kids) == 2
        processes.write(tmp_path / "processes.json", [processes.entry(parent.pid, "flower-superlink")], note="test")
        assert main(["stop", str(tmp_path), "--grace", "5"]) == 0
        out = capsys.readouterr().out
        assert _gone(parent) and not any(processes.alive(k) for k in kids)
        assert f"stopping PID {parent.pid}: flower-superlink" in out and "stopped 3 process(es)" in out
        assert bystander.poll() is None  # untouched
        # a second stop finds nothing to do and says so
        assert main(["stop", str(tmp_path / "processes.json")]) == 0
        assert f"already gone: PID {parent.pid}" in capsys.readouterr().out
    finally:
        for p in (parent, bystander):
            p.kill()
            p.wait()


def test_a_reused_pid_is_left_alone(tmp_path, capsys):
    other = _sleeper()
    try:
        rec = processes.entry(other.pid, "flower-superlink")
        rec["start"] -= 1  # the recorded process started at another time: this PID is someone else now
        processes.write(tmp_path / "processes.json", [rec], note="test")
        assert main(["stop", str(tmp_path)]) == 0
        assert f"left alone: PID {other.pid}" in capsys.readouterr().out
        assert other.poll() is None
        # a file from another boot names nothing on this one
        data = json.loads((tmp_path / "processes.json").read_text())
        rec["start"] += 1
        (tmp_path / "processes.json").write_text(json.dumps({**data, "processes": [rec], "boot_id": "other-boot"}))
        assert main(["stop", str(tmp_path)]) == 0
        assert "before this machine last booted" in capsys.readouterr().out and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_stop_without_a_processes_file_says_why(tmp_path, capsys):
    assert main(["stop", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "processes.json does not exist" in err and "flwr run" in err


def test_the_serverapp_finds_the_flower_processes_above_it(tmp_path):
    """A chain shell -> "flower-superlink" -> "flower-superexec" -> "flwr-simulation" (renamed
    with exec -a, as console scripts appear in /proc): the walk lists the three, nearest first,
    and stops at the first process that is not Flower's."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from fedkd import processes
        chain = processes.flower_ancestors()
        me = processes.flower_name(processes.command_line(os.getpid()))
        print(json.dumps({{"me": me, "chain": [processes.entry(p)["name"] for p in chain]}}))
    """))
    q = shlex.quote  # each level a forked subshell that execs under Flower's name, so the chain is real
    level3 = f"(exec -a flwr-simulation {q(sys.executable)} {q(str(probe))}); true"
    level2 = f"(exec -a flower-superexec bash -c {q(level3)}); true"
    level1 = f"(exec -a flower-superlink bash -c {q(level2)}); true"
    res = subprocess.run(["bash", "-c", level1], capture_output=True, text=True, timeout=60)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"me": "flwr-simulation", "chain": ["flower-superexec", "flower-superlink"]}, res.stderr


def test_help_explains_stop():
    res = subprocess.run([sys.executable, "-m", "simulations.cli", "stop", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    text = " ".join(res.stdout.split())
    assert "by PID" in text and "start time" in text and "pkill" in text


@pytest.mark.parametrize("name", ["flower-superlink", "/venv/bin/flwr-serverapp"])
def test_flower_names_are_read_from_either_argument(name):
    assert processes.flower_name([name, "--insecure"]) == Path(name).name
    assert processes.flower_name(["/usr/bin/python3", name]) == Path(name).name
    assert processes.flower_name(["/usr/bin/python3", "-m", "simulations.cli"]) is None
