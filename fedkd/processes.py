"""Processes by PID, never by pattern: record the ones a run depends on, stop exactly those.

`flwr run .` starts Flower's local SuperLink (and its SuperExec and simulation processes)
detached, and leaves them running after the run; a deployment whose controller is killed
leaves its SuperLink and SuperNodes. Stopping them with ``pkill -f flower-superlink`` would
also kill every other SuperLink of the user. Instead the processes are written to a
``processes.json`` file with their PID *and start time* (``/proc/<pid>/stat`` field 22, in
clock ticks since boot) and the boot id, so that ``fedkd stop`` signals a PID only while it
still names the same process: a PID reused by an unrelated process after a reboot or a
wrap-around is left alone.

Linux only (``/proc``), like ``fedkd deploy local``. No Flower import: the ServerApp and the
command line both use it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

FILE = "processes.json"
# Flower's executables whose processes serve a run: a ServerApp walks up its parents through these.
FLOWER_EXES = frozenset({"flower-superlink", "flower-superexec", "flower-supernode", "flwr-serverapp",
                         "flwr-simulation", "flwr-clientapp"})


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state letter, start time in clock ticks) of a process; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name in parentheses may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    st = proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def same_process(pid: int, start: int) -> bool:
    """``pid`` is alive and is the process that was recorded (same start time)."""
    st = proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X") and st[2] == start


def boot_id() -> str:
    """This boot's id: start times count from boot, so a record from another boot names nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def descendants(roots: Iterable[int]) -> set[int]:
    """Every live process whose chain of parents reaches one of ``roots`` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := proc_stat(int(d.name))) is not None and st[1] not in ("Z", "X"):
            parent[int(d.name)] = st[0]  # a zombie is gone already: nothing to stop
    out, frontier = set(), set(roots)
    while frontier:
        kids = {p for p, pp in parent.items() if pp in frontier and p not in out}
        out |= kids
        frontier = kids
    return out


def with_env(name: str, value: str) -> set[int]:
    """Live processes (other than this one) whose environment holds ``name=value``: a marker set
    in the environment of the processes one launcher started finds them and everything they
    started, even after their parents exited and they were reparented."""
    needle = f"{name}={value}".encode() + b"\0"
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes() + b"\0"
        except OSError:
            continue
        if needle in env and alive(int(d.name)):
            out.add(int(d.name))
    return out


def flower_name(cmd: Sequence[str]) -> str | None:
    """The Flower executable a command line runs (``flower-superlink ...`` or ``python
    .../flower-superlink ...``, as console scripts appear in /proc), else None."""
    for arg in cmd[:2]:
        name = Path(arg).name
        if name in FLOWER_EXES:
            return name
    return None


def flower_ancestors(pid: int | None = None) -> list[int]:
    """The unbroken chain of Flower processes above ``pid`` (default: this process), nearest first.

    Under `flwr run .` a ServerApp runs in ``flwr-simulation`` (or ``flwr-serverapp``) under a
    ``flower-superexec`` under the ``flower-superlink`` that served the run; under ``fedkd run``
    its parent is no Flower process and the chain is empty. The walk stops at the first parent
    that is not one of Flower's executables, so a user's shell or IDE is never included.
    """
    pid = os.getpid() if pid is None else pid
    out = []
    st = proc_stat(pid)
    while st is not None and st[0] > 1:
        ppid = st[0]
        if flower_name(command_line(ppid)) is None:
            break
        out.append(ppid)
        st = proc_stat(ppid)
    return out


def entry(pid: int, name: str | None = None) -> dict | None:
    """What :func:`write` records of one live process (None if it is gone)."""
    st = proc_stat(pid)
    if st is None:
        return None
    cmd = command_line(pid)
    name = name or flower_name(cmd) or (Path(cmd[0]).name if cmd else "")
    return {"pid": pid, "start": st[2], "name": name, "cmd": " ".join(cmd)[:500]}


def write(path: Path, entries: Sequence[dict], *, note: str) -> Path:
    """Write ``processes.json`` (atomically): the processes, this boot's id and what they are."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"note": note, "boot_id": boot_id(), "processes": list(entries)}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: only runs started by `flwr run` (or a deployment) record "
                         "their processes; `fedkd run` and `fedkd deploy local` stop theirs when they end")
    try:
        data = json.loads(path.read_text())
        procs = [(int(p["pid"]), int(p["start"]), str(p.get("name", ""))) for p in data["processes"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a processes file written by fedkd ({exc})") from None
    return {**data, "path": path, "parsed": procs}


def stop(path: Path, *, grace: float = 10.0, out: Callable[[str], None] = print) -> list[int]:
    """Stop the processes recorded in ``path`` (a processes.json or the folder holding one) and
    everything they started: SIGTERM, then SIGKILL after ``grace`` seconds.

    A recorded PID is signalled only while its start time matches the record (otherwise it is
    another process now, and is left alone). Returns the PIDs still alive at the end.
    """
    rec = read(path)
    if rec.get("boot_id") and rec["boot_id"] != boot_id():
        out(f"nothing to stop: {rec['path']} was written before this machine last booted")
        return []
    ours = []
    for pid, start, name in rec["parsed"]:
        if same_process(pid, start):
            ours.append(pid)
        elif alive(pid):
            out(f"left alone: PID {pid} ({name}) is another process now (its start time differs from the record)")
        else:
            out(f"already gone: PID {pid} ({name})")
    if not ours:
        out(f"nothing to stop from {rec['path']}")
        return []
    kids = descendants(ours) - set(ours)
    targets = {pid: (proc_stat(pid) or (0, "", -1))[2] for pid in [*ours, *sorted(kids)]}
    names = {pid: name for pid, _, name in rec["parsed"]}
    for pid in targets:
        out(f"stopping PID {pid}: {names.get(pid) or ' '.join(command_line(pid))[:120]}")

    def left() -> list[int]:
        return [p for p, s in targets.items() if same_process(p, s)]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in left():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while left() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left():
            break
    remaining = left()
    out(f"stopped {len(targets) - len(remaining)} process(es)"
        + (f"; still alive: {remaining}" if remaining else ""))
    return remaining
