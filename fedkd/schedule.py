"""Who trains what, for how long: the fleet's device profiles, student widths and selection.

The server holds a profile per client (from the tier settings or a trace file) and plays
the clock of the simulation: it knows each device's speed and links, so it can say how
many local steps fit a round's deadline before it sends anything. On a real SuperNode the
device would measure itself (``fedkd calibrate``); the arithmetic is the same
(:mod:`fedkd.simtime`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from fedkd.config import ExperimentConfig
from fedkd.devices import DeviceProfile, load_trace, tier_profiles
from fedkd.models import ModelConfig
from fedkd.nested import sub_layout

BYTES_PER_PARAMETER = 4 * 3  # float32 weights, their gradients, and the received copy the update is taken from


def fleet_profiles(cfg: ExperimentConfig, num_clients: int) -> list[DeviceProfile]:
    """One profile per partition id: from ``device-trace`` if given, else the tier settings."""
    if cfg.device_trace:
        profiles = load_trace(cfg.device_trace, num_clients)
        known = {name for name, _, _ in cfg.tiers}
        unknown = sorted({p.tier for p in profiles} - known)
        if unknown:
            raise ValueError(f"{cfg.device_trace}: tiers {unknown} are not in tier-names "
                             f"({', '.join(sorted(known))}); each trace tier needs its tier-steps")
        return profiles
    t = cfg.lists
    return tier_profiles(t.tier_names, t.tier_shares, speed=t.tier_speed, memory_mb=t.tier_memory_mb,
                         uplink_kbps=t.tier_uplink_kbps, downlink_kbps=t.tier_downlink_kbps,
                         availability=t.tier_availability, num_clients=num_clients, seed=cfg.seed,
                         spread=cfg.device_spread)


@functools.lru_cache(maxsize=256)
def footprint_mb(model: ModelConfig, width: int) -> float:
    """Training memory of a width-``width`` student, counted as HeteroFL does: its parameters
    (times weights, gradients and the received copy). Activations are left out: they scale
    with the batch, which a device can shrink, not with what it must hold between steps.
    Cached: the server asks it for every device of the fleet (0.2 ms a call: 20 s for 100,000)."""
    params = sum(int(np.prod(s)) for s in sub_layout(model, width).values())
    return params * BYTES_PER_PARAMETER / 1e6


def width_for(profile: DeviceProfile, model: ModelConfig, widths: Sequence[int]) -> int | None:
    """The widest nested student the device's memory holds; None if not even the narrowest fits."""
    fits = [w for w in widths if footprint_mb(model, w) <= profile.memory_mb]
    return max(fits) if fits else None


def tier_index(cfg: ExperimentConfig, profile: DeviceProfile) -> int:
    return [name for name, _, _ in cfg.tiers].index(profile.tier)


def select(candidates: Sequence[int], k: int, *, rng: np.random.Generator, policy: str,
           tier_of: dict[int, int], finishes: dict[int, bool]) -> list[int]:
    """Pick ``k`` of the online candidates (partition ids); all of them when k = 0 or k >= len.

    ``uniform``: a uniform draw. ``budget``: each tier gets seats in proportion to its online
    devices (at least one while it has any, so no tier is starved), filled first with its
    devices expected to finish within the deadline, then with the others; seats a tier
    cannot fill go to the remaining finishers of any tier. Pure function of its inputs.
    """
    candidates = sorted(candidates)
    if k == 0 or k >= len(candidates):
        return candidates
    if policy == "uniform":
        return sorted(rng.choice(candidates, size=k, replace=False).tolist())
    by_tier: dict[int, list[int]] = {}
    for c in candidates:
        by_tier.setdefault(tier_of[c], []).append(c)
    seats = {t: max(1, round(k * len(cs) / len(candidates))) for t, cs in by_tier.items()}
    while sum(seats.values()) > k:  # rounding and the minimum of one may overshoot
        t = max(seats, key=lambda t: (seats[t], t))
        seats[t] -= 1
    chosen: list[int] = []
    for t in sorted(by_tier):
        good = [c for c in by_tier[t] if finishes[c]]
        bad = [c for c in by_tier[t] if not finishes[c]]
        order = list(rng.permutation(good)) + list(rng.permutation(bad))
        chosen += [int(c) for c in order[:seats[t]]]
    rest = [c for c in candidates if c not in set(chosen)]
    rest_good = [c for c in rest if finishes[c]]
    rest_bad = [c for c in rest if not finishes[c]]
    fill = list(rng.permutation(rest_good)) + list(rng.permutation(rest_bad))
    chosen += [int(c) for c in fill[:k - len(chosen)]]
    return sorted(chosen)
