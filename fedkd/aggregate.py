"""Server-side combination of decoded client updates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
