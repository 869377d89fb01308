"""Distributed differential privacy on top of secure aggregation: the distributed discrete
Gaussian (DDG) of Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021 (KLS21). Mechanism and meter.

Mechanism (on the device, :func:`encode`): clip the update to L2 norm ``C``; scale it onto the
integer grid of the secure sum (``L = 2^(b-1) - 1`` steps of ``C / L`` each side of zero, so the
scaled vector has norm at most ``L``); round each coordinate stochastically and *conditionally*
(redraw while the rounded vector's norm exceeds ``Delta`` of :func:`rounded_norm_bound`, so the
integer vector's sensitivity is ``Delta``, a little above ``L``); add a share of discrete
Gaussian noise ``N_Z(0, sigma^2 / t)`` per coordinate, ``t`` the secure-aggregation threshold,
the fewest devices whose vectors the server can ever unmask. The server's unmasked sum then
carries ``N_Z``-noise of variance at least ``sigma^2``; with more survivors it carries more.

Meter (:func:`epsilon`): the RDP of the sum (KLS21 Proposition 14: the Gaussian's
``alpha / (2 z^2)``, ``z = sigma / Delta``, plus a correction ``tau`` because a sum of discrete
Gaussians is not exactly one), amplified by Poisson sampling with the general bound of Zhu and
Wang 2019 (Theorem 5; what the paper's own code, google-research/federated/distributed_dp,
uses), converted to (epsilon, delta) like central DP's (Opacus' ``get_privacy_spent``). Integer
orders only: Theorem 5 is stated for them.

Everything here is numpy and math; the sampler takes any generator with ``random(size)``: a
named seeded stream or :class:`fedkd.privacy.SecureGenerator` (``dp-secure-rng``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

BETA = math.exp(-0.5)  # conditional rounding: P(a redraw is needed) <= BETA (KLS21's value)
ROUNDING_TRIES = 200  # then round toward zero (norm <= L <= Delta): P(reaching it) <= BETA^200 = 4e-44
TAIL = 12.0  # the ring holds the noise sum up to TAIL of its subgaussian scale: P(wrap) <= 2 exp(-72) a value
ORDERS = tuple(range(2, 64)) + (80, 128, 256)  # integer Renyi orders (Zhu-Wang Theorem 5 needs integers)
MIN_SHARE_STD = 0.5  # KLS21 Theorem 1 needs each share's sigma >= 1/2


# ----------------------------------------------------------------------------- the grid
def levels(bits: int) -> int:
    """``L``: grid steps on each side of zero at ``bits``-bit codes (secure aggregation's grid)."""
    return (1 << (int(bits) - 1)) - 1


def rounded_norm_bound(norm: float, dim: int, beta: float = BETA) -> float:
    """``Delta``: the L2 norm bound of a ``dim``-vector of norm at most ``norm`` (in grid steps)
    after conditional randomized rounding (KLS21 Theorem/Proposition 22, as their code's
    ``rounded_l2_norm_bound``): plain rounding keeps the norm below ``norm + sqrt(dim)``; a
    stochastic rounding is at most ``sqrt(norm^2 + dim/4 + sqrt(2 ln(1/beta)) (norm + sqrt(dim)/2))``
    with probability at least ``1 - beta``, so redrawing until it is costs ``1 / (1 - beta)``
    draws on average."""
    plain = norm + math.sqrt(dim)
    if beta <= 0:
        return plain
    squared = norm ** 2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    return min(plain, math.sqrt(squared))


def conditional_round(y: np.ndarray, bound: float, rng, tries: int = ROUNDING_TRIES) -> np.ndarray:
    """Stochastic (unbiased) rounding of ``y`` to integers, redrawn until the result's L2 norm is
    at most ``bound``; after ``tries`` draws, rounding toward zero (never longer than ``y``).
    The check is in exact integer arithmetic."""
    low = np.floor(y)
    frac = y - low
    limit = bound * bound
    for _ in range(tries):
        r = (low + (rng.random(y.size) < frac)).astype(np.int64)
        if float(np.dot(r, r)) <= limit:
            return r
    return np.trunc(y).astype(np.int64)


# ----------------------------------------------------------------------------- the noise
def discrete_gaussian(sigma: float, size: int, rng) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma^2)`` (P(x) proportional to
    ``exp(-x^2 / (2 sigma^2))`` on the integers), int64.

    Canonne, Kamath, Steinke 2020, Algorithm 3, vectorised: a discrete Laplace draw of scale
    ``s = floor(sigma) + 1`` (the difference of two geometric draws, each ``floor(-s ln U)``),
    kept with probability ``exp(-(|Y| - sigma^2/s)^2 / (2 sigma^2))``; rejected ones are drawn
    again. Three uniforms per candidate, from ``rng.random`` only, so a seeded stream repeats and
    ``SecureGenerator`` works as is. The uniforms and the logarithms are doubles, so the
    probabilities are exact up to rounding at 2^-53 (the paper's exact version uses rationals);
    the output is an integer, without the low-order bits of a floating-point Gaussian."""
    out = np.zeros(int(size), np.int64)
    if sigma <= 0 or size == 0:
        return out
    s = math.floor(sigma) + 1
    filled = 0
    while filled < size:
        m = max(2 * (size - filled), 64)
        u = rng.random((3, m))
        y = np.floor(-s * np.log1p(-u[0])) - np.floor(-s * np.log1p(-u[1]))
        keep = u[2] < np.exp(-np.square(np.abs(y) - sigma ** 2 / s) / (2 * sigma ** 2))
        got = y[keep][: size - filled].astype(np.int64)
        out[filled:filled + got.size] = got
        filled += got.size
    return out


def discrete_gaussian_variance(sigma: float) -> float:
    """Exact variance of ``N_Z(0, sigma^2)`` (slightly below ``sigma^2``; equal to 1e-40 relative
    from sigma 2 on), summed over the integers within 40 sigma."""
    if sigma <= 0:
        return 0.0
    x = np.arange(-math.ceil(40 * sigma) - 1, math.ceil(40 * sigma) + 2, dtype=np.float64)
    w = np.exp(-x * x / (2 * sigma * sigma))
    return float(np.sum(w * x * x) / np.sum(w))


# ----------------------------------------------------------------------------- the device's step
def encode(update: Mapping[str, np.ndarray], layout: Mapping[str, tuple[int, ...]], *, clip: float, bits: int,
           rng, noise_rng, share_std: float, count_scale: int = 0) -> tuple[np.ndarray, float]:
    """A device's contribution to the noisy secure sum: integers, before reduction into the ring.

    The update (at the layout's full shapes) is clipped to ``clip``, scaled to ``L`` grid steps
    per ``clip``, conditionally rounded (norm at most :func:`rounded_norm_bound`), offset by ``L``
    (the secure sum's codes, 0.0 at code ``L``). With ``count_scale`` ``m > 0`` (adaptive
    clipping), one more coordinate ``m (1 + s)``, ``s = +1`` if the update was not clipped and
    ``-1`` if it was: the centred unclipped bit, scaled so that its noise is what the count needs.
    Every coordinate then gets a discrete Gaussian share of std ``share_std`` from ``noise_rng``
    (the round's DP noise stream). ``rng`` (the device's training stream) draws the rounding.
    Returns the vector and the update's norm before clipping."""
    flat = (np.concatenate([np.asarray(update[k], np.float64).reshape(-1) for k in layout])
            if layout else np.zeros(0))
    norm = float(np.linalg.norm(flat))
    big = levels(bits)
    y = flat * (min(1.0, clip / norm) if norm > 0 else 1.0) * (big / clip)  # ||y|| <= L, |y_i| <= L
    ints = conditional_round(y, rounded_norm_bound(big, flat.size), rng) + big
    if count_scale:
        ints = np.append(ints, count_scale * (2 if norm <= clip else 0))
    return ints + discrete_gaussian(share_std, ints.size, noise_rng), norm


# ----------------------------------------------------------------------------- the round's parameters
@dataclass(frozen=True)
class Setting:
    """The mechanism of a run, the same on the server and every device: the noise ``sigma`` of the
    sum in grid steps, its shares, the count coordinate of adaptive clipping, the ring's headroom.

    ``noise_multiplier`` ``z`` is what the accountant accounts: the sum's noise over its L2
    sensitivity. ``update_noise`` ``z_u`` (at least ``z``) sets the noise: ``sigma = z_u Delta``;
    with adaptive clipping (``count_stddev`` ``sigma_b`` > 0) the count coordinate has the weight
    ``m = floor(sigma / (2 sigma_b))``, so the vector's sensitivity ``sqrt(Delta^2 + m^2)`` over
    ``sigma`` stays at most ``1 / z`` (``z^-2 = z_u^-2 + (2 sigma_b)^-2``, as for central DP)."""

    bits: int  # code bits of the secure sum's grid
    dim: int  # model coordinates a device sends
    noise_multiplier: float  # z (accounted)
    update_noise: float  # z_u >= z (sets sigma); equal to z without adaptive clipping
    count_stddev: float = 0.0  # sigma_b: the noisy count's std (adaptive clipping)
    adaptive: bool = False  # adaptive clipping: the unclipped count is one more coordinate

    @property
    def levels(self) -> int:
        return levels(self.bits)

    @property
    def bound(self) -> float:
        """``Delta``: the L2 norm of a device's rounded vector, in grid steps (its sensitivity)."""
        return rounded_norm_bound(self.levels, self.dim)

    @property
    def std(self) -> float:
        """``sigma``: the std of the sum's noise (grid steps) when the fewest devices survive."""
        return self.update_noise * self.bound

    @property
    def count_scale(self) -> int:
        """``m``: the weight of the count coordinate (0 without adaptive clipping; 1 without noise)."""
        if not self.adaptive:
            return 0
        return int(math.floor(self.std / (2 * self.count_stddev))) if self.std > 0 and self.count_stddev > 0 else 1

    @property
    def coordinates(self) -> int:
        return self.dim + (1 if self.adaptive else 0)

    def share_std(self, t: int) -> float:
        """One device's noise share when ``t`` shares are guaranteed (the secure-aggregation threshold)."""
        return self.std / math.sqrt(max(int(t), 1))

    def noise_bound(self, n: int, t: int) -> int:
        """``T``: the ring holds noise sums in ``[-T, T]``: ``n`` shares of variance ``sigma^2 / t`` sum
        to a ``n sigma^2 / t``-subgaussian value (Canonne et al. 2020: ``N_Z(0, s^2)`` is
        ``s^2``-subgaussian), beyond ``TAIL`` of its scale with probability at most ``2 exp(-TAIL^2 / 2)``."""
        return int(math.ceil(TAIL * self.share_std(t) * math.sqrt(max(int(n), 0)))) if self.std > 0 else 0

    def top(self) -> int:
        """The largest code of any coordinate: ``2 L`` (the model), ``2 m`` (the count)."""
        return max(2 * self.levels, 2 * self.count_scale)

    def tau(self, devices: int, threshold: int) -> float:
        """KLS21's ``tau`` for the worst round of the run: at most ``devices`` shares, each of std at
        least ``z Delta / sqrt(threshold)`` (a larger sum or a smaller share only raises it)."""
        return ddg_tau(devices, self.noise_multiplier * self.bound / math.sqrt(max(threshold, 1)))

    def to_dict(self) -> dict:
        return {"bits": self.bits, "dim": self.dim, "grid_levels": self.levels, "rounded_norm_bound": self.bound,
                "noise_std_steps": self.std, "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.update_noise, "count_stddev": self.count_stddev,
                "count_scale": self.count_scale}


# ----------------------------------------------------------------------------- accounting
def ddg_tau(n: int, share_std: float) -> float:
    """KLS21 Theorem 1's ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k+1))``: how far a sum of
    ``n`` discrete Gaussians of std ``s`` is from one discrete Gaussian."""
    if n <= 1 or share_std <= 0:
        return 0.0 if n <= 1 else math.inf
    k = np.arange(1, int(n), dtype=np.float64)
    return float(10 * np.sum(np.exp(-2 * math.pi ** 2 * share_std ** 2 * k / (k + 1))))


def ddg_rdp(order: float, l2_scale: float, tau: float, dim: int) -> float:
    """RDP at ``order`` of one release of the distributed discrete Gaussian (KLS21 Proposition 14):
    ``min(alpha/2 l2^2 + tau d, alpha/2 (l2 + tau sqrt(d))^2)``, ``l2`` = sensitivity / std of the
    sum. (Its third form needs the L1 sensitivity; leaving it out only loosens the bound, and with
    ``tau`` near 0, as in every practical setting, all three equal the Gaussian's ``alpha l2^2 / 2``.)"""
    return min(order / 2 * l2_scale ** 2 + tau * dim, order / 2 * (l2_scale + math.sqrt(dim) * tau) ** 2)


_LOG_FACT = np.array([math.lgamma(n + 1) for n in range(max(ORDERS) + 1)])  # log n!


def subsampled_rdp(order: int, q: float, rdp: np.ndarray) -> float:
    """Zhu and Wang 2019, Theorem 5: the RDP at integer ``order`` of Poisson sampling at rate ``q``
    of any mechanism whose RDP at integer order ``l`` is ``rdp[l]`` (``rdp`` indexed from 0, entries
    from 2 on used), as google-research/federated/distributed_dp's
    ``_compute_rdp_subsampled(upper_bound=True)``; never above the unsampled ``rdp[order]``::

        (1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^rdp(2)
          + 3 sum_{l=3..a} C(a,l) q^l (1-q)^(a-l) e^((l-1) rdp(l)),   log of it over (a - 1)

    For the Gaussian's ``rdp(l) = l / (2 z^2)`` it is Mironov et al.'s exact sampled Gaussian,
    except for the factor 3 (tests/test_ddp.py): the price of a bound that holds for any mechanism."""
    a = int(order)
    if q >= 1:
        return float(rdp[a])
    if q <= 0:
        return 0.0
    lq, l1q = math.log(q), math.log1p(-q)
    j = np.arange(2, a + 1)
    comb = _LOG_FACT[a] - _LOG_FACT[j] - _LOG_FACT[a - j]
    terms = comb + j * lq + (a - j) * l1q + (j - 1) * rdp[j] + np.where(j >= 3, math.log(3), 0.0)
    terms = np.append(terms, (a - 1) * l1q + math.log(a * q - q + 1))
    top = float(terms.max())
    return min(float(rdp[a]), (top + math.log(float(np.sum(np.exp(terms - top))))) / (a - 1))


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, rate: float, rounds: int, delta: float, *, tau: float = 0.0,
            dim: int = 1) -> float:
    """Epsilon at ``delta`` after ``rounds`` Poisson-sampled DDG releases whose sum has noise
    ``noise_multiplier`` times its L2 sensitivity, with KLS21's ``tau`` over ``dim`` coordinates.
    With ``tau = 0`` and ``rate = 1`` this is exactly the Gaussian's epsilon at these orders."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0 or not math.isfinite(tau):
        return math.inf
    from opacus.accountants.analysis import rdp as opacus_rdp

    l2 = 1.0 / noise_multiplier
    one = np.array([ddg_rdp(a, l2, tau, dim) if a >= 2 else 0.0 for a in range(max(ORDERS) + 1)])
    rdp = np.array([subsampled_rdp(a, min(1.0, rate), one) * int(rounds) for a in ORDERS])
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": 2 is the smallest integer order
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)
