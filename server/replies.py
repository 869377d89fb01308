"""Checking train replies before anything uses them: each bad one refused with a reason code.

Every check raises :class:`fedkd.codec.PayloadError` with a code from ``fedkd.codec.REASONS``,
in the order a careful server runs them: size before decoding, metrics, the step count, then
the payload against the server's own layout (the protocol's ``decode``). Steps are checked
against the allowance this server sent, not the limit the client reports, so a device cannot
grant itself more work than it was given. Last, with ``norm-reject``, updates far above the
round's median norm are refused (a comparison across replies, so it runs after all of them
are decoded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedkd.aggregate import norm_outliers, update_norm
from fedkd.codec import PayloadError
from server.transport import Node, Transport
from wire import Content, unpack

REPLY_SLACK = 64 * 1024  # bytes a reply may carry beyond twice its train message (metrics, framing)
REQUIRED_METRICS = ("num-examples", "steps", "loss")


@dataclass(frozen=True)
class Upload:
    """One accepted train reply: who sent it, its checked metrics, and its decoded payload."""

    node: Node
    metrics: dict
    payload: object


def accept(replies, r: int, *, decode: Callable[[Content, Node], object], allowed: dict[int, int],
           sizes: dict[int, tuple[int, int]], max_reply_bytes: int, norm_reject: float,
           transport: Transport) -> tuple[list[Upload], dict[int, str]]:
    """Validate and decode replies; returns the accepted uploads and the reason code of every
    rejected partition (each also logged by ``transport``)."""
    accepted, rejected = [], {}
    for node, rep in replies:
        pid = node.partition_id
        try:
            down, up = sizes[pid]
            limit = max_reply_bytes or 2 * down + REPLY_SLACK
            if up > limit:
                raise PayloadError("oversized", f"reply of {up} bytes exceeds the limit of {limit} bytes")
            got = unpack(rep.content)
            m = reply_metrics(got)
            if not 0 <= m["steps"] <= allowed[pid]:
                raise PayloadError("steps", f"reports {m['steps']} steps; it was allowed {allowed[pid]}")
            accepted.append(Upload(node, m, decode(got, node)))
        except PayloadError as exc:
            rejected[pid] = transport.reject(r, node, "train", exc)
    if norm_reject and accepted:
        norms = [update_norm(u.payload) for u in accepted]
        median = float(np.median(norms))
        keep = []
        for u, n, out in zip(accepted, norms, norm_outliers(norms, norm_reject)):
            if out:
                rejected[u.node.partition_id] = transport.reject(r, u.node, "train", PayloadError(
                    "norm", f"update norm {n:.4g} exceeds norm-reject {norm_reject:g} x the round's median {median:.4g}"))
            else:
                keep.append(u)
        accepted = keep
    return accepted, rejected


def check_finite(got: Content) -> None:
    """One rule for every float the server will use."""
    for name, arrays in got.arrays.items():
        for key, a in arrays.items():
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise PayloadError("non-finite", f"'{name}/{key}' holds non-finite values (NaN or inf)")


def reply_metrics(got: Content) -> dict:
    """The metrics a train reply must carry, type- and range-checked (reason codes as for arrays)."""
    m = got.metrics.get("metrics")
    if m is None:
        raise PayloadError("missing-key", "reply lacks its metrics record ('metrics')")
    missing = [k for k in REQUIRED_METRICS if k not in m]
    if missing:
        raise PayloadError("missing-key", f"reply metrics lack {missing}")
    for k in REQUIRED_METRICS:
        if isinstance(m[k], bool) or not isinstance(m[k], (int, float)):
            raise PayloadError("malformed", f"metric '{k}' is {m[k]!r}, not a number")
    if not np.isfinite(m["loss"]) or not np.isfinite(m["num-examples"]):
        raise PayloadError("non-finite", f"reported loss {m['loss']!r} / num-examples {m['num-examples']!r}")
    if m["num-examples"] < 0 or float(m["steps"]) != int(m["steps"]):
        raise PayloadError("malformed", f"num-examples {m['num-examples']!r} and steps {m['steps']!r} must be "
                                        "counts >= 0")
    return {**m, "steps": int(m["steps"])}
