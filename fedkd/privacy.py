"""Client-level differential privacy for fedkd's parameter exchange: mechanism and meter.

Mechanism (pure functions): each client's update is clipped to L2 norm ``C``
(:func:`clip_update`) and Gaussian noise of standard deviation ``z * C`` is added, either
once to the *sum* of the clipped updates at the server (central DP, DP-FedAvg of McMahan
et al. 2018) or to each clipped update on the device before it is quantised (local DP).
Clients are chosen by Poisson sampling with rate ``q`` when central DP is on
(:func:`poisson_sample`), because that is the sampling the amplification bound assumes;
the mean is the noisy sum divided by the *expected* number of participants ``q * n``
(the "fixed denominator" estimator), so one client changes the release by at most ``C / (q n)``.

Meter (:class:`PrivacyAccountant`): records only what was released, ``(z, q, count)``
like Opacus' accountants, and converts it into epsilon at a given delta with Opacus' RDP
analysis. Why Opacus: it is the PyTorch ecosystem's maintained accountant, needs nothing
fedkd does not already have (torch), and its RDP of the sampled Gaussian at fractional
orders equals a direct numerical integration (tests/test_privacy.py), while Google's
``dp-accounting`` 0.6 (which Flower's ``RdpAccountant`` wraps) is up to ~0.1% conservative
there; dp-accounting is the independent check in the tests. Its state is a small JSON-able
dict (:meth:`PrivacyAccountant.to_dict` / :meth:`from_dict`).

Distributed DP (``dp-mode = distributed``, :mod:`fedkd.ddp`): the devices clip, round and add
shares of discrete Gaussian noise under secure aggregation's masks; the accountant counts the
rounds like central DP's, with the distributed discrete Gaussian's RDP (:func:`fedkd.ddp.epsilon`),
and also the releases of each client, for the epsilon without amplification by sampling.

Unit of privacy: one *client* (one user with the default ``users-per-client = 1``), i.e.
user-level DP for edge users. Cloud users opted in and are not protected. Evaluation
metrics and training metrics (example counts, losses) that clients report are *not*
covered, as in Flower's DP wrappers; see docs/privacy.md.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedkd import ddp, streams
from fedkd.streams import Stream

Update = Mapping[str, np.ndarray]
MODES = ("off", "central", "local", "distributed")


# ----------------------------------------------------------------------------- mechanism
def l2_norm(update: Update) -> float:
    """Global L2 norm over every tensor of an update (float64 accumulation)."""
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in update.values())))


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` by ``min(1, C / ||update||)``; return it (float32) and its norm before clipping."""
    if not clip_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, np.float64) * scale).astype(np.float32) for k, v in update.items()}, norm


def add_gaussian_noise(update: Update, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``update + N(0, std^2 I)``, tensor by tensor in the update's order (so a seed repeats)."""
    if std < 0:
        raise ValueError(f"noise standard deviation must be >= 0, got {std}")
    return {k: (np.asarray(v, np.float64) + (rng.normal(0.0, std, size=np.shape(v)) if std > 0 else 0.0))
            .astype(np.float32) for k, v in update.items()}


def poisson_sample(candidates: Sequence[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Each candidate independently with probability ``rate`` (one uniform draw per candidate,
    in sorted order, so the draw does not depend on anything but the seed)."""
    if not 0 < rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
    cs = sorted(candidates)
    draws = rng.random(len(cs))
    return [c for c, u in zip(cs, draws) if u < rate]


# ----------------------------------------------------------------------------- randomness
class SecureGenerator:
    """The few draws DP needs (``normal``, ``random``), from the operating system's CSPRNG.

    Every bit comes from :func:`os.urandom` (``getrandom(2)`` on Linux: the kernel's ChaCha20
    generator, the source :mod:`secrets` uses), so no seed, state or earlier output predicts
    the next draw. A numpy ``Generator`` does not give that even when seeded from ``secrets``:
    PCG64 is a statistical generator whose 128-bit state can be recovered from its outputs
    (Bouillaguet, Martinez, Sauvage 2020), after which every later noise draw is known.

    ``random``: 53 random bits per float, ``k / 2^53`` in [0, 1). ``normal``: Box-Muller on
    pairs ``u1 = (k1 + 1) / 2^53`` in (0, 1], ``u2 = k2 / 2^53``, both outputs used; its tails
    are cut at sqrt(2 ln 2^53) = 8.6 standard deviations (mass 1e-17). Not addressed here:
    floating-point Gaussian samples leak through their low-order bits (Mironov, CCS 2012); a
    discrete Gaussian (Canonne, Kamath, Steinke 2020) would close that (docs/privacy.md).
    """

    @staticmethod
    def _bits53(n: int) -> np.ndarray:
        return np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)

    def random(self, size=None):
        n = int(np.prod(size)) if size is not None else 1
        u = self._bits53(n).astype(np.float64) * 2.0 ** -53
        return u.reshape(size) if size is not None else float(u[0])

    def normal(self, loc=0.0, scale=1.0, size=None):
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        n = int(np.prod(size)) if size is not None else 1
        pairs = (n + 1) // 2
        k = self._bits53(2 * pairs).astype(np.float64)
        u1, u2 = (k[:pairs] + 1.0) * 2.0 ** -53, k[pairs:] * 2.0 ** -53
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
        z = loc + scale * z
        return z.reshape(size) if size is not None else float(z[0])


def dp_rng(secure: bool, seed: int, stream: Stream, *ids: int):
    """The generator of one DP draw: the named seeded stream (simulation: a run repeats), or
    with ``dp-secure-rng`` the OS's CSPRNG (deployment: nobody who knows the seed, and every
    device knows the run config, can recompute and subtract the noise)."""
    return SecureGenerator() if secure else streams.rng(seed, stream, *ids)


# ----------------------------------------------------------------------------- accounting
def _rdp():
    try:
        from opacus.accountants.analysis import rdp
    except ImportError as exc:  # pragma: no cover - a dependency of fedkd
        raise ImportError("differential privacy needs Opacus' RDP analysis: pip install opacus") from exc
    return rdp


# Opacus' default orders (RDPAccountant.DEFAULT_ALPHAS) plus larger ones for tiny epsilons.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512])


@functools.lru_cache(maxsize=4096)
def epsilon_for(noise_multiplier: float, rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` Poisson-sampled Gaussian releases at ``rate``
    (add-or-remove-one neighbouring clients), by Renyi DP: Opacus' ``compute_rdp`` (Mironov,
    Talwar, Zhang 2019) and its RDP -> (epsilon, delta) conversion (Balle et al. 2020), over
    :data:`ORDERS`. ``inf`` without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    rdp = _rdp()
    orders = list(ORDERS)
    r = rdp.compute_rdp(q=min(1.0, rate), noise_multiplier=noise_multiplier, steps=int(rounds), orders=orders)
    eps, _ = rdp.get_privacy_spent(orders=orders, rdp=r, delta=delta)
    return float(eps)


def calibrate_noise(target_epsilon: float, rate: float, rounds: int, delta: float, *,
                    tol: float = 1e-4, epsilon=None) -> float:
    """Smallest noise multiplier (to ``tol`` relative) whose ``rounds`` releases stay within
    ``target_epsilon`` at ``delta``: bisection on :func:`epsilon_for` (or on ``epsilon(z)``, another
    mechanism's epsilon of the same releases), which falls as noise grows."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    eps_of = epsilon or (lambda z: epsilon_for(z, rate, rounds, delta))
    lo, hi = 0.0, 1.0
    while eps_of(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta}")
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if eps_of(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class PrivacyAccountant:
    """Counts released rounds and reports epsilon; holds no model data.

    ``mode`` "central": one release per round of the noisy aggregate, sampled at ``rate``.
    ``mode`` "local": every participating client releases its own noisy update; the server
    sees who took part, so there is no amplification by sampling, and the guarantee is that
    of the most exposed client (``max(participations)`` Gaussian releases).
    ``mode`` "distributed": one release per round of the noisy secure sum, sampled at ``rate``,
    priced by the distributed discrete Gaussian's RDP (``tau``, ``dim``: :func:`fedkd.ddp.epsilon`);
    the participations are counted too, for :meth:`epsilon_unamplified`.
    """

    mode: str
    noise_multiplier: float
    rate: float
    delta: float
    target_epsilon: float = 0.0  # 0 = no budget
    rounds: int = 0  # central, distributed: releases so far
    participations: dict[int, int] = field(default_factory=dict)  # local, distributed: per partition id
    tau: float = 0.0  # distributed: KLS21's correction for a sum of discrete Gaussians
    dim: int = 1  # distributed: coordinates of the noisy sum
    cap: int = 0  # local: the most noisy updates one device may send (dp-local-participations; 0 = no cap)

    def __post_init__(self) -> None:
        if self.mode not in ("central", "local", "distributed"):
            raise ValueError(f"accountant mode must be central, local or distributed, got {self.mode!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    # -- what has been spent
    @property
    def releases(self) -> int:
        """Gaussian releases that count for the most exposed client."""
        return self.rounds if self.mode != "local" else max(self.participations.values(), default=0)

    def epsilon(self, releases: int | None = None) -> float:
        n = self.releases if releases is None else releases
        if self.mode == "distributed":
            return ddp.epsilon(self.noise_multiplier, self.rate, n, self.delta, tau=self.tau, dim=self.dim)
        rate = self.rate if self.mode == "central" else 1.0
        return epsilon_for(self.noise_multiplier, rate, n, self.delta)

    def epsilon_unamplified(self) -> float:
        """Distributed: the most exposed client's epsilon without amplification by sampling (the
        server picked the devices, so it knows who took part): each of its releases one unsampled
        DDG release, a device that stays in the round with a zero update as its neighbour."""
        return ddp.epsilon(self.noise_multiplier, 1.0, max(self.participations.values(), default=0), self.delta,
                           tau=self.tau, dim=self.dim)

    # -- the budget
    def would_exceed(self, partition_ids: Sequence[int] = ()) -> tuple[bool, float]:
        """Whether one more release (central: a round; local: these clients taking part) would
        take epsilon past the target; also returns the epsilon it would reach."""
        if self.mode != "local":
            nxt = self.rounds + 1
        else:
            nxt = max([self.participations.get(p, 0) + 1 for p in partition_ids], default=self.releases)
        eps = self.epsilon(nxt)
        return bool(self.target_epsilon > 0 and eps > self.target_epsilon * (1 + 1e-9)), eps

    def exhausted(self, partition_id: int) -> bool:
        """Local mode: this client has sent its cap of noisy updates, or one more would take it
        past the target."""
        if self.cap and self.participations.get(int(partition_id), 0) >= self.cap:
            return True
        return self.would_exceed([partition_id])[0]

    def record(self, partition_ids: Sequence[int] = ()) -> None:
        """Record one release: a round (central), these clients' noisy updates (local), or both
        (distributed: the round's noisy sum, and the clients whose shares went into it)."""
        if self.mode != "local":
            self.rounds += 1
        for p in partition_ids if self.mode != "central" else ():
            self.participations[int(p)] = self.participations.get(int(p), 0) + 1

    # -- state, for checkpoints
    def to_dict(self) -> dict:
        out = {"mode": self.mode, "noise_multiplier": self.noise_multiplier, "rate": self.rate,
               "delta": self.delta, "target_epsilon": self.target_epsilon, "rounds": self.rounds,
               "participations": {str(k): v for k, v in sorted(self.participations.items())}}
        if self.cap:
            out["cap"] = self.cap
        return {**out, "tau": self.tau, "dim": self.dim} if self.mode == "distributed" else out

    @classmethod
    def from_dict(cls, d: Mapping) -> PrivacyAccountant:
        return cls(mode=str(d["mode"]), noise_multiplier=float(d["noise_multiplier"]), rate=float(d["rate"]),
                   delta=float(d["delta"]), target_epsilon=float(d.get("target_epsilon", 0.0)),
                   rounds=int(d["rounds"]),
                   participations={int(k): int(v) for k, v in dict(d.get("participations", {})).items()},
                   tau=float(d.get("tau", 0.0)), dim=int(d.get("dim", 1)), cap=int(d.get("cap", 0)))

    def report(self) -> dict:
        """What a results folder shows: the state plus epsilon at delta."""
        eps = self.epsilon()
        out = {**self.to_dict(), "epsilon": _json_number(eps), "releases": self.releases}
        if self.mode == "distributed":
            out["epsilon_unamplified"] = _json_number(self.epsilon_unamplified())
        return out


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


# ----------------------------------------------------------------------------- wiring
def sampling_rate(clients_per_round: int, num_clients: int) -> float:
    """Poisson rate that gives ``clients_per_round`` participants in expectation (1 = everyone)."""
    if num_clients < 1:
        raise ValueError("no clients to sample")
    return 1.0 if clients_per_round == 0 or clients_per_round >= num_clients else clients_per_round / num_clients


@functools.lru_cache(maxsize=32)
def resolve_noise(mode: str, noise_multiplier: float, target_epsilon: float, rate: float, rounds: int,
                  delta: float) -> float:
    """The noise multiplier a run uses: the configured one, or (configured 0 and a target set)
    the smallest that keeps ``rounds`` releases within the target. Local DP has no sampling
    amplification, so it calibrates for a client that takes part in every round. Cached:
    a device calibrates once per process, from the run config alone (it does not trust the
    server to tell it how much noise to add)."""
    if noise_multiplier > 0 or target_epsilon <= 0:
        return noise_multiplier
    return calibrate_noise(target_epsilon, rate if mode == "central" else 1.0, rounds, delta)


def local_releases(cfg) -> int:
    """Local DP: the noisy updates one device may send, which its noise is calibrated for
    (``dp-local-participations``, else ``num-rounds``). Why a cap: the server sees who took part,
    so a device's epsilon grows with its own participations, and calibrating for all rounds
    prices a device picked in every one: picked 150 of 754 a round over 120 rounds, a device
    takes part in 24 on average and the most picked of a run in about 36, so calibrating for 120
    gives it twice the noise its target needs (and an epsilon half the target)."""
    return int(cfg.dp_local_participations or cfg.num_rounds)


def accountant_for(cfg, num_clients: int, *, dim: int | None = None) -> PrivacyAccountant | None:
    """The run's accountant (None when DP is off); ``cfg`` is an ExperimentConfig. Distributed DP
    needs ``dim``, the coordinates of a device's update (:func:`distributed_for`)."""
    if cfg.dp_mode == "off":
        return None
    if cfg.dp_mode == "distributed":
        if dim is None:
            raise ValueError("distributed DP's accountant needs the update's dimension")
        return distributed_for(cfg, num_clients, dim)[0]
    rate = sampling_rate(cfg.clients_per_round, num_clients)
    z = resolve_noise(cfg.dp_mode, cfg.dp_noise_multiplier, cfg.dp_target_epsilon, rate,
                      local_releases(cfg) if cfg.dp_mode == "local" else cfg.num_rounds, cfg.dp_delta)
    return PrivacyAccountant(mode=cfg.dp_mode, noise_multiplier=z, rate=rate, delta=cfg.dp_delta,
                             target_epsilon=cfg.dp_target_epsilon,
                             cap=cfg.dp_local_participations if cfg.dp_mode == "local" else 0)


def distributed_for(cfg, num_clients: int, dim: int):
    """Distributed DP's accountant (a fresh one) and mechanism (:class:`fedkd.ddp.Setting`), from
    the config, the number of clients that can take part and the update's dimension ``dim``."""
    setting, tau = _distributed(cfg, num_clients, dim)
    acc = PrivacyAccountant(mode="distributed", noise_multiplier=setting.noise_multiplier,
                            rate=sampling_rate(cfg.clients_per_round, num_clients), delta=cfg.dp_delta,
                            target_epsilon=cfg.dp_target_epsilon, tau=tau, dim=setting.coordinates)
    return acc, setting


@functools.lru_cache(maxsize=32)
def _distributed(cfg, num_clients: int, dim: int):
    """``(setting, tau)`` of :func:`distributed_for`, cached (the calibration is the slow part).

    ``z`` is ``dp-noise-multiplier``, or the smallest that keeps ``num-rounds`` rounds within
    ``dp-target-epsilon`` by the DDG accountant. ``tau`` is priced for the worst round: every
    client a survivor, each share at the largest threshold ``t`` (the fewest survivors a round
    of all clients guarantees), at the accounted ``z``. With adaptive clipping the noise is split
    as for central DP (:func:`adaptive_noise_split`) and the count is one more coordinate.
    Refuses shares below the discrete Gaussian bound's range and rings above 32 bits."""
    from fedkd import secagg

    rate = sampling_rate(cfg.clients_per_round, num_clients)
    bits = secagg.code_bits(cfg.quant_bits)
    bound = ddp.rounded_norm_bound(ddp.levels(bits), dim)
    t_max = secagg.threshold(num_clients, cfg.secagg_threshold)
    coords = dim + (1 if cfg.dp_clip_adaptive else 0)

    def tau(z: float) -> float:
        return ddp.ddg_tau(num_clients, z * bound / math.sqrt(t_max)) if z > 0 else 0.0

    z = cfg.dp_noise_multiplier
    if z <= 0 and cfg.dp_target_epsilon > 0:
        z = calibrate_noise(cfg.dp_target_epsilon, rate, cfg.num_rounds, cfg.dp_delta,
                            epsilon=lambda x: ddp.epsilon(x, rate, cfg.num_rounds, cfg.dp_delta, tau=tau(x),
                                                          dim=coords))
    count_std, z_u = 0.0, z
    if cfg.dp_clip_adaptive:
        count_std, z_u = adaptive_noise_split(z, rate * num_clients, cfg.dp_clip_count_stddev)
    setting = ddp.Setting(bits=bits, dim=dim, noise_multiplier=z, update_noise=z_u,
                          count_stddev=count_std, adaptive=cfg.dp_clip_adaptive)
    if z > 0 and setting.share_std(t_max) < ddp.MIN_SHARE_STD:
        raise ValueError(f"distributed DP: a device's noise share would be {setting.share_std(t_max):.3g} grid "
                         f"steps (noise multiplier {z:.4g} x rounded norm bound {bound:.4g} / sqrt({t_max} devices)), "
                         f"below the {ddp.MIN_SHARE_STD} the discrete Gaussian's bound needs; raise "
                         "dp-noise-multiplier or quant-bits")
    if setting.adaptive and setting.count_scale < 1:
        raise ValueError(f"distributed DP: the noise on the clipped count (dp-clip-count-stddev {count_std:.4g}) is "
                         f"more than half the sum's noise ({setting.std:.4g} grid steps): lower dp-clip-count-stddev")
    secagg.ring_bits(num_clients, bits, noise_bound=setting.noise_bound(num_clients, t_max), top=setting.top())
    return setting, tau(z)


def private_sum(updates: Sequence[Update], clip_norm: float) -> tuple[dict[str, np.ndarray], list[float]]:
    """Sum of the clipped updates (float64) and every update's norm before clipping.

    All updates must have the same keys and shapes (narrow HeteroFL updates are embedded
    into zeros of the full shapes first, which keeps their norm)."""
    total: dict[str, np.ndarray] = {}
    norms = []
    for u in updates:
        clipped, n = clip_update(u, clip_norm)
        norms.append(n)
        for k, v in clipped.items():
            total[k] = total.get(k, 0.0) + v.astype(np.float64)
    return total, norms


def noisy_mean(total: Update, *, std: float, denominator: float, rng: np.random.Generator,
               template: Update) -> dict[str, np.ndarray]:
    """``(total + N(0, std^2 I)) / denominator``; ``template`` gives the shapes when nobody
    took part (the release happens every round, participants or not)."""
    base = {k: np.asarray(total.get(k, np.zeros(np.shape(v))), np.float64) for k, v in template.items()}
    noisy = add_gaussian_noise(base, std, rng)
    return {k: (v.astype(np.float64) / denominator).astype(np.float32) for k, v in noisy.items()}


# ----------------------------------------------------------------------------- adaptive clipping
def adaptive_noise_split(noise_multiplier: float, expected_clients: float,
                         count_stddev: float = 0.0) -> tuple[float, float]:
    """``(sigma_b, z_update)``: the noise on the count of unclipped updates and the noise
    multiplier of the update sum, so that both releases together cost what one Gaussian
    release at ``noise_multiplier`` costs (Andrew et al. 2021, Thm. 1; Flower's
    ``compute_adaptive_noise_params``): ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.

    The ``2 sigma_b`` is the count's sensitivity 1/2: each client adds its indicator minus 1/2
    (:class:`QuantileClip`). ``count_stddev`` 0 means the paper's default, expected clients / 20.
    Without noise (``z = 0``) neither release is noised beyond ``count_stddev``."""
    if noise_multiplier <= 0:
        return float(count_stddev), 0.0
    sigma_b = float(count_stddev) or expected_clients / 20
    if noise_multiplier >= 2 * sigma_b:
        raise ValueError(f"adaptive clipping: the noise on the clipped count (dp-clip-count-stddev, here "
                         f"{sigma_b:.4g}{'' if count_stddev else ' = expected clients per round / 20'}) must be "
                         f"more than half the noise multiplier {noise_multiplier:.4g}, or the count alone would "
                         "spend the whole budget; raise dp-clip-count-stddev or clients-per-round")
    return sigma_b, (noise_multiplier ** -2 - (2 * sigma_b) ** -2) ** -0.5


@dataclass
class QuantileClip:
    """The clipping norm that tracks a quantile of the update norms (Andrew et al. 2021).

    Each round, with the clip ``C`` used that round: every client contributes ``b_i - 1/2``,
    ``b_i = 1`` if its update norm is at most ``C`` (it was not clipped); the sum gets
    ``N(0, sigma_b^2)``; ``share = noisy sum / expected clients + 1/2``, cut to [0, 1]; then
    ``C <- C exp(-lr (share - quantile))``: too many unclipped updates shrink ``C``, too few
    grow it. This is TensorFlow Privacy's ``QuantileEstimatorQuery`` with geometric updates and
    Flower's ``_geometric_update``; Flower's server-side wrapper counts the *clipped* updates
    instead (and divides by the replies, not the expected count) but moves ``C`` with the
    same sign, which drives ``C`` away from its target (docs/privacy.md)."""

    clip: float
    quantile: float
    lr: float
    count_stddev: float
    expected: float  # expected participants per round (q n): the fixed denominator

    def update(self, norms: Sequence[float], rng) -> float:
        """Move the clip after a round whose updates had ``norms``; returns the noisy unclipped share."""
        centred = sum(1 for x in norms if x <= self.clip) - 0.5 * len(norms)
        if self.count_stddev > 0:
            centred += float(rng.normal(0.0, self.count_stddev))
        return self.step(centred)

    def step(self, centred: float) -> float:
        """Move the clip from an already noisy centred count ``sum_i (b_i - 1/2) + noise`` (distributed
        DP: summed and noised under secure aggregation); returns the unclipped share."""
        share = min(1.0, max(0.0, centred / self.expected + 0.5))
        self.clip *= math.exp(-self.lr * (share - self.quantile))
        return share

    def state_dict(self) -> dict:
        return {"clip": self.clip}

    def load_state_dict(self, state: Mapping) -> None:
        self.clip = float(state["clip"])


def local_dp(update: Update, cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A device's local DP step: clip its own update to ``dp-clip-norm`` and add noise of std
    ``z * C``, with ``z`` from the run config alone (calibrated for a device that takes part
    in as many rounds as ``dp-local-participations`` allows, :func:`local_releases`, when only a
    target epsilon is given). In a deployment ``rng`` should be
    a cryptographically secure generator (``dp-secure-rng``: :class:`SecureGenerator`); the
    simulation seeds it by default so runs repeat."""
    z = resolve_noise("local", cfg.dp_noise_multiplier, cfg.dp_target_epsilon, 1.0, local_releases(cfg),
                      cfg.dp_delta)
    clipped, _ = clip_update(update, cfg.dp_clip_norm)
    return add_gaussian_noise(clipped, z * cfg.dp_clip_norm, rng)
