"""Which online clients train in a round: a part chosen once, when the experiment is composed.

Central DP's privacy amplification assumes each client is included independently with
probability q (Poisson sampling), so a run with central DP samples that way; every other run
draws a fixed number (``clients-per-round``), uniformly or by tier budget (:func:`fedkd.schedule.select`).
"""

from __future__ import annotations

from fedkd import streams
from fedkd.privacy import dp_rng, poisson_sample
from fedkd.schedule import select
from fedkd.simtime import ClientTiming
from fedkd.streams import Stream


class FixedSizeSampler:
    def __init__(self, *, seed: int, k: int, policy: str, tier_of: dict[int, int]) -> None:
        self.seed, self.k, self.policy, self.tier_of = seed, k, policy, tier_of

    def __call__(self, pids: list[int], plans: dict[int, ClientTiming], r: int) -> set[int]:
        return set(select(pids, self.k, rng=streams.rng(self.seed, Stream.SELECTION, r), policy=self.policy,
                          tier_of=self.tier_of, finishes={p: not t.straggler for p, t in plans.items()}))


class PoissonSampler:
    """``secure_rng`` (``dp-secure-rng``): the draws come from the OS's CSPRNG, so that who was
    sampled, which the amplification bound assumes hidden, cannot be recomputed from the seed."""

    def __init__(self, *, seed: int, rate: float, secure_rng: bool = False) -> None:
        self.seed, self.rate, self.secure_rng = seed, rate, secure_rng

    def __call__(self, pids: list[int], plans: dict[int, ClientTiming], r: int) -> set[int]:
        return set(poisson_sample(pids, self.rate, dp_rng(self.secure_rng, self.seed, Stream.SELECTION, r)))
