"""From accepted uploads to the global model's new state: aggregators, wrappers and the server step.

An aggregator turns a round's uploads into one mean update at the full student's shapes (or
None: nothing to apply). They compose the way Flower's strategies do:

==================  ==============================================================
``WeightedMean``     FedAvg, trimmed mean, norm bounding, HeteroFL nested widths
``SecureSum``        the sum of masked uploads (the server never sees one update)
``ClippedSum``       the sum of updates clipped to the DP norm
``CentralDP(sum)``   wraps a sum (clipped or secure) and releases its noisy mean,
                     as Flower's ``DifferentialPrivacyServerSideFixedClipping``
                     wraps a strategy
==================  ==============================================================

The server step (:mod:`fedkd.server_opt`: FedAvg with ``server-lr``, FedAvgM, FedAdam, ...)
then moves the state along the mean update; it is the only place the global model changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.serverapp import Grid

from fedkd.aggregate import apply_update, combine
from fedkd.nested import embed, sub_layout
from fedkd.privacy import PrivacyAccountant, QuantileClip, dp_rng, noisy_mean, private_sum
from fedkd.server_opt import lr_scale
from fedkd.secagg import FRAC_BITS, decode as decode_fixed, unflatten, unmask_sum
from fedkd.streams import Stream
from server.replies import Upload
from server.transport import Node, Transport
from wire import Content, unpack

log = logging.getLogger("fedkd")


@dataclass
class Aggregate:
    """A round's mean update (None: leave the model as it is) and what the aggregator measured."""

    update: dict | None
    bounded: int = 0  # updates scaled down by norm bounding
    released: bool = False  # a DP release happened (the accountant records it)
    norms: list[float] = field(default_factory=list)  # norms before DP clipping, where the server saw them
    clip: float | None = None  # the DP clip norm of the round, when it varies (adaptive clipping)
    columns: dict = field(default_factory=dict)  # metrics.csv columns of the aggregator (adaptive clipping)


class WeightedMean:
    """Example-weighted mean (or trimmed mean) of the decoded updates, nested by width, with
    optional norm bounding. ``equal_weights`` under local DP: example counts are private."""

    def __init__(self, full_model, width_of: dict[int, int | None], *, aggregation: str, trim_fraction: float,
                 norm_bound: float, equal_weights: bool) -> None:
        self.full_model, self.width_of = full_model, width_of
        self.aggregation, self.trim_fraction, self.norm_bound = aggregation, trim_fraction, norm_bound
        self.equal_weights = equal_weights

    def __call__(self, uploads: list[Upload], r: int) -> Aggregate:
        if not uploads:
            return Aggregate(None)
        entries = [(u.node.partition_id, self.width_of[u.node.partition_id], u.payload,
                    1.0 if self.equal_weights else float(u.metrics["num-examples"])) for u in uploads]
        update, factors = combine(entries, self.full_model, aggregation=self.aggregation,
                                  trim_fraction=self.trim_fraction, norm_bound=self.norm_bound)
        return Aggregate(update, bounded=sum(f < 1 for f in factors))


class SecureSum:
    """Pairwise-mask secure aggregation (:mod:`fedkd.secagg`): a key exchange before the train
    messages go out, then the sum of the masked uploads, unmasked by cancellation."""

    def __init__(self, full_model, student_dim: int, transport: Transport) -> None:
        self.layout = sub_layout(full_model, student_dim)
        self.transport = transport
        self.key_set: list[int] = []

    def before_train(self, grid: Grid, sent: list[Node], contents, r: int) -> tuple[list[Node], tuple[int, int]]:
        """Step 1: every node about to train makes a key pair and sends its public key; the sorted
        (partition id, key) list goes into the round's train messages. Returns the nodes that
        answered and the step's (down, up) bytes."""
        ask = Content(configs={"config": {"round": r}})
        ex = self.transport.exchange(grid, [(n, ask) for n in sent], "query.secagg_keys", r)
        keys = {}
        for node, rep in ex.replies:
            pub = unpack(rep.content).arrays.get("secagg", {}).get("public")
            if pub is not None and pub.dtype == np.uint8 and pub.shape == (32,):
                keys[node.partition_id] = pub
            else:
                self.transport.rejections.append({"round": r, "partition_id": node.partition_id,
                                                  "node_id": node.node_id,
                                                  "reason": "secure aggregation: no valid 32-byte public key"})
        self.key_set = sorted(keys)
        peers = {"ids": np.asarray(self.key_set, np.int64),
                 "keys": np.stack([keys[i] for i in self.key_set]) if keys else np.zeros((0, 32), np.uint8)}
        for c in contents:
            c.arrays["peers"] = peers
        return [n for n in sent if n.partition_id in keys], (ex.down, ex.up)

    def total(self, uploads: list[Upload], r: int) -> dict | None:
        """Step 2: the unmasked sum at the full student's shapes; None (round void, logged) if a
        key holder's upload is missing: without secret sharing its masks cannot be removed."""
        if not self.key_set:
            return {k: np.zeros(s, np.float64) for k, s in self.layout.items()}
        try:
            total = decode_fixed(unmask_sum({u.node.partition_id: u.payload for u in uploads}, self.key_set),
                                 FRAC_BITS)
        except ValueError as exc:
            self.transport.rejections.append({"round": r, "partition_id": None, "node_id": None, "reason": str(exc)})
            log.warning("round %d: %s; the round's update is void", r, exc)
            return None
        return unflatten(total, self.layout)

    def __call__(self, uploads: list[Upload], r: int) -> Aggregate:
        total = self.total(uploads, r)
        if total is None or not uploads:
            return Aggregate(None)
        return Aggregate({k: (v / len(uploads)).astype(np.float32) for k, v in total.items()})


class ClippedSum:
    """The sum of the decoded updates, each embedded at full width and clipped to ``clip``."""

    def __init__(self, full_model, width_of: dict[int, int | None], student_dim: int, clip: float) -> None:
        self.full_model, self.width_of, self.student_dim, self.clip = full_model, width_of, student_dim, clip
        self.norms: list[float] = []

    def total(self, uploads: list[Upload], r: int) -> dict:
        full = [embed(u.payload, self.full_model, w)[0] if (w := self.width_of[u.node.partition_id]) != self.student_dim
                else u.payload for u in uploads]
        total, self.norms = private_sum(full, self.clip)
        return total


class CentralDP:
    """Central DP around a sum: Gaussian noise of std ``z * C`` on the sum, divided by the
    expected number of participants (q x eligible clients); a release every round, with or
    without participants, unless the inner sum is void.

    With ``adaptive`` (a :class:`fedkd.privacy.QuantileClip`, server-side clipping only) the
    clip norm ``C`` of each round is the clipper's, the sum's noise multiplier is
    ``update_noise`` (``z_update`` of :func:`fedkd.privacy.adaptive_noise_split`, above the
    accounted ``z``), and after the release the clipper moves ``C`` from the round's noisy
    count, as Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` does. ``secure_rng``:
    noise from the OS's CSPRNG instead of the seeded streams (``dp-secure-rng``)."""

    def __init__(self, inner: ClippedSum | SecureSum, accountant: PrivacyAccountant, *, clip: float,
                 eligible: int, seed: int, template: dict, secure_rng: bool = False,
                 adaptive: QuantileClip | None = None, update_noise: float | None = None) -> None:
        self.inner, self.acc, self.clip, self.eligible, self.seed = inner, accountant, clip, eligible, seed
        self.template = template  # shapes of the full student, for a round nobody took part in
        self.secure_rng, self.adaptive, self.update_noise = secure_rng, adaptive, update_noise

    def __call__(self, uploads: list[Upload], r: int) -> Aggregate:
        clip, z = self.clip, self.acc.noise_multiplier
        if self.adaptive is not None:
            clip, z = self.adaptive.clip, self.update_noise
            self.inner.clip = clip
        total = self.inner.total(uploads, r)
        if total is None:
            return Aggregate(None)
        update = noisy_mean(total, std=z * clip, denominator=self.acc.rate * self.eligible,
                            rng=dp_rng(self.secure_rng, self.seed, Stream.CENTRAL_DP_NOISE, r), template=self.template)
        norms = list(getattr(self.inner, "norms", []))
        if self.adaptive is None:
            return Aggregate(update, released=True, norms=norms)
        share = self.adaptive.update(norms, dp_rng(self.secure_rng, self.seed, Stream.CLIP_COUNT_NOISE, r))
        return Aggregate(update, released=True, norms=norms, clip=clip,
                         columns={"dp_clip_norm": clip, "dp_unclipped_share": share})

    def state_dict(self) -> dict:
        return {"adaptive": self.adaptive.state_dict()} if self.adaptive is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])

    @property
    def before_train(self):  # secure aggregation's key exchange, when the sum is secure
        return getattr(self.inner, "before_train", None)


class FedAvgStep:
    """The plain server step: ``state + server_lr * mean update`` (FedAvg at server-lr 1), in
    float32 as before the server optimizers existed, so those runs stay byte-identical."""

    def __init__(self, server_lr: float) -> None:
        self.server_lr = server_lr

    def step(self, state: dict, update: dict, *, server_round: int | None = None, scale: float = 1.0) -> dict:
        return apply_update(state, update, self.server_lr * scale)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ServerStep:
    """The server optimizer of :mod:`fedkd.server_opt` (or :class:`FedAvgStep`) with its learning
    rate following ``server-lr-schedule`` over the run's rounds."""

    def __init__(self, optimizer, *, schedule: str = "constant", num_rounds: int = 1, final: float = 1.0) -> None:
        self.optimizer, self.schedule, self.num_rounds, self.final = optimizer, schedule, num_rounds, final

    def scale(self, r: int) -> float:
        return lr_scale(self.schedule, r, num_rounds=self.num_rounds, final=self.final)

    def step(self, state: dict, update: dict, r: int) -> dict:
        return self.optimizer.step(state, update, server_round=r, scale=self.scale(r))

    def columns(self, r: int) -> dict:
        """Round ``r``'s metrics column: the factor on server-lr, when it varies."""
        return {} if self.schedule == "constant" else {"server_lr_scale": self.scale(r)}

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
