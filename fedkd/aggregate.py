"""Server-side combination of decoded client updates: FedAvg and its robust variants.

Robust options (docs/reliability.md), each a small pure function so it can be tested on
hand-made arrays:

* norm bounding (:func:`bound_norms`): every update is scaled down to at most ``multiple``
  times the round's median update norm, so one boosted update moves the model no more
  than a few honest ones (Sun et al. 2019, "Can you really backdoor FL?"). The bound is
  relative to the median because update norms depend on the model, learning rate and step
  allowance; an absolute bound would need re-tuning for every experiment;
* norm rejection (:func:`norm_outliers`): the same yardstick, but the update is refused;
* coordinate-wise trimmed mean (:func:`trimmed_mean`, Yin et al. 2018; Flower's
  ``FedTrimmedAvg``): per coordinate the lowest and highest ``trim`` share of values are
  dropped and the rest averaged, weighted by examples like FedAvg.

Order: :func:`combine` sorts the clients by partition id before anything is summed, so the
order in which replies arrive cannot change a single bit of the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean of updates (FedAvg); float64 accumulation so order cannot matter."""
    if not updates:
        raise ValueError("no updates to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be >= 0 with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    return {k: sum(wi * np.asarray(u[k], np.float64) for wi, u in zip(w, updates)).astype(np.float32)
            for k in updates[0]}


def apply_update(state: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
                 server_lr: float) -> dict[str, np.ndarray]:
    return {k: (state[k] + server_lr * update[k]).astype(np.float32) for k in state}


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every entry of an update (float64 accumulation)."""
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in update.values())))


def norm_outliers(norms: Sequence[float], multiple: float) -> list[bool]:
    """Which updates have a norm above ``multiple`` x the median norm (all False when off)."""
    if multiple <= 0 or not norms:
        return [False] * len(norms)
    limit = multiple * float(np.median(np.asarray(norms, np.float64)))
    return [n > limit for n in norms]


def bound_norms(updates: Sequence[Mapping[str, np.ndarray]], multiple: float) -> tuple[list[dict], list[float]]:
    """Scale each update down to at most ``multiple`` x the median norm; returns the updates
    and the factor applied to each (1.0 where nothing changed, so an honest majority is
    left bit-identical)."""
    norms = [update_norm(u) for u in updates]
    limit = multiple * float(np.median(np.asarray(norms, np.float64))) if norms else 0.0
    out, factors = [], []
    for u, n in zip(updates, norms):
        f = limit / n if multiple > 0 and n > limit else 1.0
        factors.append(f)
        out.append(dict(u) if f == 1.0 else {k: (np.asarray(v, np.float64) * f).astype(np.float32)
                                              for k, v in u.items()})
    return out, factors


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], *,
                 trim: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean: per entry, drop the ``floor(trim * n)`` lowest and highest
    client values, then take the ``weights``-weighted mean of the rest (a plain mean where the
    kept clients' weights sum to 0). ``trim = 0`` equals :func:`weighted_mean` up to float64
    rounding. Ties are broken by position (stable sort), so pass clients in a canonical order."""
    if not updates:
        raise ValueError("no updates to aggregate")
    n = len(updates)
    k = min(int(np.floor(trim * n + 1e-12)), (n - 1) // 2)  # keep at least one value
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"aggregation weights must be {n} finite numbers >= 0, got {w.tolist()}")
    out = {}
    for key in updates[0]:
        x = np.stack([np.asarray(u[key], np.float64) for u in updates])  # (n, ...)
        order = np.argsort(x, axis=0, kind="stable")[k:n - k]  # (n - 2k, ...) kept clients per entry
        vals = np.take_along_axis(x, order, axis=0)
        ww = w[order]
        total = ww.sum(axis=0)
        mean = np.where(total > 0, (vals * ww).sum(axis=0) / np.where(total > 0, total, 1.0), vals.mean(axis=0))
        out[key] = mean.astype(np.float32)
    return out


def combine(entries: Sequence[tuple[int, int, Mapping[str, np.ndarray], float]], full_cfg, *,
            aggregation: str = "mean", trim_fraction: float = 0.0,
            norm_bound: float = 0.0) -> tuple[dict[str, np.ndarray], list[float]]:
    """One round's update from ``(partition_id, width, update, weight)`` entries.

    Sorted by partition id first (arrival order must not matter); norm bounding, then the
    HeteroFL nested combination (:func:`fedkd.nested.nested_mean`) with the weighted mean or
    the trimmed mean on each ring of entries. Returns the update and the norm-bound factor
    of each client (in partition-id order). With the defaults this is exactly the old
    FedAvg path (``nested_mean`` with ``weighted_mean``)."""
    from fedkd.nested import nested_mean  # nested imports this module

    if aggregation not in ("mean", "trimmed-mean"):
        raise ValueError(f"aggregation must be mean or trimmed-mean, got {aggregation!r}")
    entries = sorted(entries, key=lambda e: e[0])
    updates = [u for _, _, u, _ in entries]
    factors = [1.0] * len(updates)
    if norm_bound > 0:
        updates, factors = bound_norms(updates, norm_bound)
    reduce: Callable = weighted_mean
    if aggregation == "trimmed-mean":
        def reduce(us, ws):  # noqa: E306 - the ring reducer of nested_mean
            return trimmed_mean(us, ws, trim=trim_fraction)
    update = nested_mean([(w, u) for (_, w, _, _), u in zip(entries, updates)],
                         [wt for _, _, _, wt in entries], full_cfg, reduce=reduce)
    return update, factors
