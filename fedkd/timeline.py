"""Per-message timestamps of a deployment, for ``python -m simulations.deploy_bench``.

Off unless ``FEDKD_PROFILE_DIR`` names a folder in the environment (``fedkd deploy local``
passes its environment to every process it starts, and Flower passes it on to the ServerApp
and ClientApp processes). Then each process appends one JSON line per event to
``<dir>/<role>-<pid>.jsonl``: the ServerApp when it pushed a message and when it pulled the
reply, the SuperNode when it took the message from the SuperLink, the ClientApp when its
handler started, had its data, and returned. Lines carry Flower's message id, so the bench
joins them into the life of each message. All timestamps are ``time.time()`` of one
machine. Nothing is written, and nothing changes, when the variable is unset.

No Flower import (the SuperNode launcher, the ServerApp and the ClientApp all use it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "FEDKD_PROFILE_DIR"


def folder() -> Path | None:
    """The folder timestamps go to, or None when profiling is off."""
    value = os.environ.get(ENV, "")
    return Path(value) if value else None


def enabled() -> bool:
    return folder() is not None


def record(role: str, **fields: object) -> None:
    """Append one event of this process (``role``: server, supernode, client) if profiling is on."""
    where = folder()
    if where is None:
        return
    where.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"role": role, "pid": os.getpid(), **fields}, sort_keys=True, default=str)
    with (where / f"{role}-{os.getpid()}.jsonl").open("a") as f:
        f.write(line + "\n")


def read(where: Path) -> list[dict]:
    """Every event written into ``where``, in no particular order."""
    out = []
    for path in sorted(Path(where).glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def process_start(pid: int | None = None) -> float:
    """When a process started, in ``time.time()`` seconds (from ``/proc``: its start and the
    uptime, both in the kernel's boot clock, 10 ms resolution); NaN where ``/proc`` cannot tell."""
    try:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
        started = int(stat[stat.rfind(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return time.time() - (uptime - started)


def now() -> float:
    return time.time()
