"""`fedkd run --ray-address HOST:PORT`: run the simulation on an existing Ray cluster.

Flower's simulation engine runs every ClientApp in a Ray actor. Without an address, fedkd
has Flower start a private Ray instance on this machine (``ray.init(num_cpus=N)``). With
one, Flower attaches to a cluster that was started beforehand with ``ray start --head`` on
one machine and ``ray start --address HEAD:PORT`` on the others, and Flower places one
ClientApp actor per CPU of *every* node (``pool_size_from_resources`` in
``flwr/simulation/ray_transport/ray_actor.py`` counts each alive node's CPUs).

How the address reaches Ray, read from flwr 1.41's sources: ``RayBackend.init_ray``
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``) calls
``ray.init(runtime_env={"env_vars": {"PYTHONPATH": ...}}, **backend_config["init_args"])``, so
the address goes in Flower's own backend config as ``init_args["address"]``; Flower and Ray
are not patched. Ray refuses ``num_cpus``/``num_gpus`` in ``ray.init`` when it attaches (the
nodes declared theirs at ``ray start``), so those are left out; ``--num-cpus`` is refused with
``--ray-address``. ``flwr run``'s own simulation settings (``options.backend.init-args`` of a
SuperLink connection) have no address key in 1.41, which is why this is a ``fedkd run``
option. ``ray.init`` given no address attaches to the cluster named by ``RAY_ADDRESS`` if that
is set (``ray/_private/worker.py``), so a local run removes it from this process's
environment: a run uses a cluster only when its command line names one.

No Flower or Ray import here: the address is checked before the engine starts.
"""

from __future__ import annotations

import os
import socket

ADDRESS_ENV = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = 5.0


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 literal) of a Ray head node's GCS.

    Raises
    ------
    ValueError
        For anything else, naming what to give instead (Ray's ``auto``, ``local`` and the
        ``ray://`` Ray Client addresses are refused: see the messages).
    """
    text = text.strip()
    if text.startswith("ray://"):
        raise ValueError(f"--ray-address {text}: Ray Client (ray://) addresses are not supported; run fedkd on a "
                         f"node of the cluster and give the head node's HOST:PORT (`ray start --head --port PORT`)")
    if text in ("auto", "local", ""):
        raise ValueError(f"--ray-address {text!r}: give the head node's HOST:PORT (what `ray start --head` printed, "
                         f"e.g. 192.168.1.10:6379); without --ray-address, fedkd starts Ray on this machine")
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray-address {text!r} is not HOST:PORT (the head node's address and the port given to "
                         f"`ray start --head --port`, e.g. 192.168.1.10:6379)")
    return host, int(port)


def check_reachable(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an address where nothing listens, before the engine starts.

    A TCP connection to the head node's GCS port, closed at once: it tells "nothing there" (a
    typo, a stopped cluster, a firewall) from a cluster that is up. What only Ray can check (a
    different Ray or Python version on the cluster, a port that is not Ray's) is reported by
    ``ray.init`` inside the engine, which ``fedkd run`` turns into exit code 3.

    Raises
    ------
    ValueError
        The address is malformed or nothing answered within ``timeout`` seconds.
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ValueError(f"cannot reach the Ray cluster at {address} ({why}). Is its head node running "
                         f"(`ray start --head --port {port}` on {host}; `ray status --address {address}`) "
                         f"and is the port open from here? Nothing was started.") from None


def backend_config(*, num_cpus: int, ray_address: str | None) -> dict:
    """Flower's Ray backend config: one CPU per ClientApp actor, and either a private Ray
    instance of ``num_cpus`` CPUs or the cluster at ``ray_address``."""
    init_args: dict = {"logging_level": "ERROR", "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args.update(num_cpus=num_cpus, num_gpus=0)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def drop_address_env() -> str | None:
    """Remove ``RAY_ADDRESS`` from this process's environment before a local run (``ray.init``
    without an address would attach to it, and then refuse ``num_cpus``); return what it was."""
    return os.environ.pop(ADDRESS_ENV, None) or None
