"""What a device spends on each message, as the device itself measures it: time and peak memory.

A device whose node config names ``usage-log`` (``flower-supernode --node-config
"... usage-log=\"/var/lib/fedkd/usage.jsonl\""``) appends one JSON line per message it handles
(:func:`record`): the message type and round, the seconds its handler took, the seconds since
its process started (with Flower's own SuperNode a ClientApp process starts per message, so
this is the device's whole cost of the message but the reply's upload; fedkd's long-lived
ClientApp worker counts from when it claimed the message instead), its peak resident memory so far
(``getrusage``'s ``ru_maxrss``: exact, the kernel's high-water mark), its data memory at the
end of the handler (``VmData``, what a data cap bounds), and what confines it
(CPUs it may run on, its data-memory limit, ``RLIMIT_DATA``). :func:`summarize` turns the lines of one device
into its peak and per-round times; ``fedkd deploy local`` reports them for every node.
Linux for the process age and CPU list (``/proc``, ``sched_getaffinity``); None elsewhere. No Flower import.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["append", "confinement", "data_mb", "peak_rss_mb", "process_seconds", "read", "record", "summarize"]


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB (10^6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def data_mb() -> float | None:
    """This process's data memory now (``VmData``, MB: heap and private writable mappings, thread
    stacks included, shared libraries not): what an ``RLIMIT_DATA`` cap bounds."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


TASK_START_ENV = "FEDKD_TASK_START"  # set by a long-lived ClientApp worker: when it claimed the current task


def process_seconds() -> float | None:
    """Seconds since this process started (``/proc``), or, in a long-lived ClientApp worker
    (``simulations/clientapp_worker.py``), since it claimed the message's task (it sets
    ``FEDKD_TASK_START``): either way the device's cost of the message but the reply's upload.
    None where there is no ``/proc``."""
    if started := os.environ.get(TASK_START_ENV):
        return time.time() - float(started)
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    start_ticks = int(stat[stat.rfind(")") + 2:].split()[19])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def confinement() -> dict[str, object]:
    """CPUs this process may run on and its data-memory limit (``RLIMIT_DATA``, MB; None = unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpus": cpus, "memory_limit_mb": None if soft == resource.RLIM_INFINITY else soft / 1e6}


def record(message_type: str, round_idx: int | None, handler_s: float, *, error: bool = False) -> dict[str, object]:
    """One usage line for a message this process just handled."""
    age = process_seconds()
    return {"type": message_type, "round": round_idx, "handler_s": round(handler_s, 4),
            "process_s": None if age is None else round(age, 3), "peak_rss_mb": round(peak_rss_mb(), 2),
            "data_mb": None if (vm := data_mb()) is None else round(vm, 1),
            "error": error, "pid": os.getpid(), **confinement()}


def append(path: str | os.PathLike, line: Mapping[str, object]) -> None:
    """Append one line (one write on a file opened for appending: lines of processes that write
    one after another never interleave)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")


def read(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def summarize(lines: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """One device's usage: its peak memory over every message, and per round its train message's
    times (``process_s`` from its process's start to the reply, ``handler_s`` the handler alone)."""
    lines = list(lines)
    train = sorted((ln for ln in lines if ln["type"] == "train" and ln.get("round") is not None),
                   key=lambda ln: ln["round"])
    limits = [ln["memory_limit_mb"] for ln in lines if ln.get("memory_limit_mb") is not None]
    cpus = [tuple(ln["cpus"]) for ln in lines if ln.get("cpus") is not None]
    return {"messages": len(lines), "errors": sum(1 for ln in lines if ln.get("error")),
            "peak_rss_mb": max((float(ln["peak_rss_mb"]) for ln in lines), default=None),
            "cpus": list(max(cpus, key=len)) if cpus else None,
            "memory_limit_mb": min(limits) if limits else None,
            "data_mb": max((float(ln["data_mb"]) for ln in lines if ln.get("data_mb") is not None), default=None),
            "rounds": [{"round": ln["round"], "process_s": ln["process_s"], "handler_s": ln["handler_s"],
                        "peak_rss_mb": ln["peak_rss_mb"]} for ln in train]}
