"""Device tiers and the step budget a client may spend per round.

A mechanism (training) is kept apart from its meter: the training loop asks the meter
for permission before every step, so no code path can train past a tier's allowance.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence

import numpy as np

from fedkd import streams
from fedkd.streams import Stream


class BudgetExceeded(RuntimeError):
    """Raised when code tries to spend a step the budget does not have."""


class StepBudget:
    """Counts local steps against a fixed allowance; saves and restores as a dict."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"step budget must be >= 0, got {limit}")
        self.limit = int(limit)
        self.spent = 0

    @property
    def remaining(self) -> int:
        return self.limit - self.spent

    def spend(self, steps: int = 1) -> None:
        if steps < 0:
            raise ValueError(f"cannot spend a negative number of steps ({steps})")
        if steps > self.remaining:
            raise BudgetExceeded(f"asked for {steps} step(s) with {self.remaining} of {self.limit} left")
        self.spent += steps

    def state(self) -> dict[str, int]:
        return {"limit": self.limit, "spent": self.spent}


def assign_tiers(num_clients: int, shares: Sequence[float], seed: int) -> np.ndarray:
    """Tier index of every client: exact shares (largest remainder), shuffled by the seed.

    Exact counts rather than independent draws, so a 2-tier 50/50 fleet of 10 clients has
    5 of each and small fleets still contain every tier. The array is cached and read-only:
    every client's data view indexes it (fedkd.edge), and drawing it for 100,000 clients costs
    about a millisecond, which made deriving 100,000 views cost minutes.
    """
    return _assign_tiers(num_clients, tuple(float(s) for s in shares), seed)


@functools.lru_cache(maxsize=16)
def _assign_tiers(num_clients: int, shares: tuple[float, ...], seed: int) -> np.ndarray:
    shares = np.asarray(shares, dtype=np.float64)
    raw = shares * num_clients
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: num_clients - counts.sum()]] += 1
    tiers = np.repeat(np.arange(len(shares)), counts)
    out = streams.rng(seed, Stream.TIERS).permutation(tiers)
    out.flags.writeable = False
    return out
