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
``DistributedDP``    wraps a secure sum whose devices added the noise (fedkd.ddp)
                     and releases its mean; the server adds nothing
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
from fedkd import secagg, streams
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
    used: int | None = None  # uploads that went into the update (None: all of them, if there is one)
    nbytes: tuple[int, int] = (0, 0)  # (down, up) bytes the aggregator exchanged itself (secure aggregation)


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
    """Secure aggregation with dropout recovery (:mod:`fedkd.secagg`): the share step before the
    train messages go out, the masked uploads, then the unmask step and the survivors' exact sum.
    A round with fewer survivors than the threshold is refused (logged with its reason in
    ``rejections.jsonl`` and ``run.log``): nothing goes into the model."""

    def __init__(self, full_model, student_dim: int, transport: Transport, *, quant_bits: int,
                 threshold: float, initial_range: float, adaptive: bool, weighted: bool = False,
                 noise=None, shares: int = 0, group_size: int = 0, seed: int = 0) -> None:
        self.layout = sub_layout(full_model, student_dim)
        self.transport = transport
        self.bits, self.fraction, self.adaptive = secagg.code_bits(quant_bits), threshold, adaptive
        self.weighted = weighted  # devices send examples/reference x update; the mean divides by their sum
        self.noise = noise  # distributed DP's fedkd.ddp.Setting: the ring holds the noise, and maybe a count
        self.shares, self.seed = int(shares), int(seed)  # SecAgg+'s neighbourhoods (0: all), drawn per round
        self.group_size = int(group_size)  # one secure sum per group of at most this many (0: one for the round)
        self.ranges = np.full(len(self.layout), float(initial_range))
        self._reset()

    def _reset(self) -> None:
        self.grid, self.round, self.ids, self.t = None, None, [], 0
        self.graph: dict[int, list[int]] = {}  # device -> its neighbourhood (itself included)
        self.share_t = 0  # shares that rebuild one seed: a fraction of a neighbourhood
        self.mask_keys: dict[int, bytes] = {}
        self.inbox: dict[int, dict[int, bytes]] = {}  # receiver -> {sender: ciphertext}
        self.node_of: dict[int, Node] = {}
        self.used, self.nbytes, self.reference, self.weight = None, (0, 0), 1.0, 0.0
        self.extra = np.zeros(self.extras, np.int64)  # the sums of the coordinates after the update's (the count)
        self.last_groups: list[tuple[list[int], dict]] = []  # with groups: each accepted group's survivors and sum

    @property
    def extras(self) -> int:
        """Coordinates after the update's and its range statistics: distributed DP's count."""
        return 1 if self.noise is not None and self.noise.adaptive else 0

    @property
    def noise_bound(self) -> int:
        """The noise sum the ring holds (0 without distributed DP), for this round's holders and threshold."""
        return self.noise.noise_bound(len(self.mask_keys), self.t) if self.noise is not None else 0

    @property
    def ring_bits(self) -> int:
        top = self.noise.top() if self.noise is not None else None
        return secagg.ring_bits(len(self.mask_keys), self.bits, noise_bound=self.noise_bound, top=top)

    @property
    def length(self) -> int:
        """Values in a masked upload: the codes, the range statistics, the extra coordinates."""
        return secagg.input_length(self.layout, stats=self.adaptive) + self.extras

    def expected_bytes(self, pid: int | None = None) -> int:
        """Size of a masked upload this round (of device ``pid``'s, with groups): every value at the ring's bits."""
        return secagg.packed_ring_bytes(self.length, self.ring_bits if pid is None or not self.group_size
                                        else self._group_ring(self.graph[pid]))

    def _group_ring(self, group: list[int]) -> int:
        """A group's ring: the headroom of its devices that shared keys (what each of them counts too)."""
        return secagg.ring_bits(sum(j in self.mask_keys for j in group), self.bits)

    def before_train(self, grid: Grid, sent: list[Node], contents, r: int) -> tuple[list[Node], tuple[int, int]]:
        """Step 1: the devices about to train share their seeds (encrypted, routed by the server);
        the mask public keys of those that answered, and the round's quantisation ranges, go into
        the train messages. Returns the nodes that answered and the step's (down, up) bytes."""
        self._reset()
        self.grid, self.round = grid, r
        nodes = [n for n in sent if len(n.enc_key) == secagg.KEY_BYTES]
        for n in sent:
            if n not in nodes:
                self._reject(r, n, "no encryption key from the handshake")
        self.ids = [n.partition_id for n in nodes]
        self.node_of = {n.partition_id: n for n in nodes}
        self.t = secagg.threshold(len(self.ids), self.fraction) if self.ids else 0
        rng = streams.rng(self.seed, Stream.SECAGG_GRAPH, r)
        self.graph = (secagg.groups(self.ids, self.group_size, rng) if self.group_size
                      else secagg.neighbourhoods(self.ids, self.shares, rng))
        near = len(self.graph[self.ids[0]]) if self.ids else 0
        self.share_t = secagg.threshold(near, self.fraction) if self.ids else 0
        config = {"round": r, "threshold": self.t}  # the round's t: the fewest survivors it accepts
        if near < len(self.ids) and not self.group_size:  # SecAgg+: a neighbourhood's own threshold
            config["share-threshold"] = self.share_t

        def config_of(pid: int) -> dict:  # with groups, each group is a round of its own: its own t
            return {**config, "threshold": secagg.threshold(len(self.graph[pid]), self.fraction)} \
                if self.group_size else dict(config)
        key_of = {n.partition_id: n.enc_key for n in nodes}
        asks = [(n, Content(configs={"config": config_of(n.partition_id), "peers": {
            "ids": self.graph[n.partition_id],
            "keys": b"".join(key_of[j] for j in self.graph[n.partition_id])}})) for n in nodes]
        ex = self.transport.exchange(grid, asks, "query.secagg_keys", r)
        for node, rep in ex.replies:
            i = node.partition_id
            blob = unpack(rep.content).configs.get("secagg", {}).get("shares")
            try:
                pub, cts = secagg.split_reply(blob if isinstance(blob, bytes) else b"", len(self.graph[i]))
            except secagg.SecAggError as exc:
                self._reject(r, node, f"malformed share reply: {exc}")
                continue
            self.mask_keys[i] = pub
            for j, ct in zip([j for j in self.graph[i] if j != i], cts):
                self.inbox.setdefault(j, {})[i] = ct
        holders = sorted(self.mask_keys)
        if holders:  # a public reference count, so that weighted updates keep the scale of the ranges
            self.reference = float(np.mean([self.node_of[i].examples for i in holders])) or 1.0
        for c in contents:
            c.configs["peers"] = {"ids": holders, "keys": b"".join(self.mask_keys[i] for i in holders)}
            c.configs["config"]["secagg-ranges"] = [float(x) for x in self.ranges]
            if self.weighted:
                c.configs["config"]["secagg-examples"] = self.reference
        return [n for n in sent if n.partition_id in self.mask_keys], (ex.down, ex.up)

    def total(self, uploads: list[Upload], r: int) -> dict | None:
        """Steps 3 and 4: the survivors reveal shares, the server removes every mask and returns the
        survivors' sum at the full student's shapes; None (round refused, logged) below the threshold.
        ``last_sum`` keeps the unmasked sum of the round (None when refused): what the server
        learns under secure aggregation, for the reconstruction attack."""
        self.used, self.last_sum, self.last_groups = 0, None, []
        if not self.mask_keys:  # nobody took part: an empty sum (central DP still releases its noise)
            return {k: np.zeros(shape, np.float64) for k, shape in self.layout.items()}
        if self.group_size:
            return self._grouped_total(uploads, r)
        masked = {u.node.partition_id: secagg.unpack_ring(u.payload, self.ring_bits, self.length) for u in uploads}
        survivors = sorted(masked)
        if len(survivors) < self.t:
            return self._refuse(r, f"only {len(survivors)} of the {len(self.mask_keys)} devices that shared their "
                                   f"seeds sent a valid masked update; the threshold is {self.t}")
        holders = sorted(self.mask_keys)
        items = []
        for i in survivors:  # each survivor hears of its own neighbourhood only
            near = set(self.graph[i])
            senders = [j for j in holders if j != i and j in near and j in self.inbox.get(i, {})]
            items.append((self.node_of[i], Content(configs={
                "config": {"round": r},
                "peers": {"survivors": [j for j in survivors if j in near], "from": senders,
                          "shares": b"".join(self.inbox[i][j] for j in senders)}})))
        ex = self.transport.exchange(self.grid, items, "query.secagg_unmask", r)
        self.nbytes = (ex.down, ex.up)
        revealed = self._revealed(ex.replies, r)
        try:
            total = secagg.unmask(masked, self.mask_keys, self.ids, revealed, self.t, self.ring_bits, r,
                                  graph=self.graph, share_t=self.share_t)
        except (secagg.SecAggError, ValueError) as exc:
            return self._refuse(r, str(exc))
        if self.noise is not None:  # a noisy sum: back from the ring to signed integers
            total = secagg.lift(total, self.ring_bits, self.noise_bound)
        if self.extras:
            total, self.extra = total[:-self.extras], total[-self.extras:]
        sums, ratio = secagg.dequantize_sum(total, len(survivors), self.layout, self.ranges, self.bits,
                                            stats=self.adaptive)
        self.ranges = secagg.next_ranges(self.ranges, ratio)
        self.used, self.last_sum = len(survivors), sums
        # the weights the survivors applied, from the example counts their replies report
        self.weight = (sum(float(u.metrics["num-examples"]) for u in uploads) / self.reference if self.weighted
                       else float(self.used))
        return sums

    def _grouped_total(self, uploads: list[Upload], r: int) -> dict | None:
        """``total`` with groups: each group's survivors reveal shares of their own group's seeds,
        each group's sum is unmasked in its own ring and added to the others' as exact integers
        (so without refusals the round's sum is the one a single secure sum gives, bit for bit). A
        group below its threshold is refused alone (logged); the round only if every group is."""
        masked = {u.node.partition_id: secagg.unpack_ring(u.payload, self._group_ring(self.graph[u.node.partition_id]),
                                                          self.length) for u in uploads}
        accepted = []
        for group in sorted({tuple(self.graph[i]) for i in self.mask_keys}):
            holders = [j for j in group if j in self.mask_keys]
            alive, t = [j for j in holders if j in masked], secagg.threshold(len(group), self.fraction)
            if len(alive) < t:
                self._refuse_group(r, group, f"only {len(alive)} of its {len(holders)} devices that shared their "
                                             f"seeds sent a valid masked update; its threshold is {t}")
            else:
                accepted.append((list(group), holders, alive, t))
        items = []
        for group, holders, alive, _ in accepted:
            for i in alive:
                senders = [j for j in holders if j != i and j in self.inbox.get(i, {})]
                items.append((self.node_of[i], Content(configs={
                    "config": {"round": r},
                    "peers": {"survivors": alive, "from": senders,
                              "shares": b"".join(self.inbox[i][j] for j in senders)}})))
        ex = self.transport.exchange(self.grid, items, "query.secagg_unmask", r) if items else None
        self.nbytes = (ex.down, ex.up) if ex else (0, 0)
        revealed = self._revealed(ex.replies if ex else [], r)
        total, used = np.zeros(self.length, np.int64), []
        for group, holders, alive, t in accepted:
            try:
                got = secagg.unmask({i: masked[i] for i in alive}, {j: self.mask_keys[j] for j in holders}, group,
                                    {i: s for i, s in revealed.items() if i in group}, t,
                                    secagg.ring_bits(len(holders), self.bits), r)
            except (secagg.SecAggError, ValueError) as exc:
                self._refuse_group(r, tuple(group), str(exc))
                continue
            total += got.astype(np.int64)  # the group's exact sum: its ring has the headroom
            used += alive
            self.last_groups.append((alive, secagg.dequantize_sum(got, len(alive), self.layout, self.ranges,
                                                                  self.bits, stats=self.adaptive)[0]))
        if not used:
            return self._refuse(r, f"every group of at most {self.group_size} devices was refused")
        sums, ratio = secagg.dequantize_sum(total, len(used), self.layout, self.ranges, self.bits, stats=self.adaptive)
        self.ranges = secagg.next_ranges(self.ranges, ratio)
        self.used, self.last_sum = len(used), sums
        counted = set(used)
        self.weight = (sum(float(u.metrics["num-examples"]) for u in uploads if u.node.partition_id in counted)
                       / self.reference if self.weighted else float(self.used))
        return sums

    def _revealed(self, replies, r: int) -> dict[int, dict[int, bytes]]:
        """Step 3's answers: responder -> {holder of its neighbourhood or group: the share it revealed};
        a malformed answer is rejected (logged) and left out."""
        revealed = {}
        for node, rep in replies:
            blob = unpack(rep.content).configs.get("secagg", {}).get("shares")
            mine = [j for j in self.graph[node.partition_id] if j in self.mask_keys]  # one share per holder near it
            if not isinstance(blob, bytes) or len(blob) != len(mine) * secagg.SEED_BYTES:
                self._reject(r, node, "malformed unmask reply")
                continue
            revealed[node.partition_id] = {j: blob[x * secagg.SEED_BYTES:(x + 1) * secagg.SEED_BYTES]
                                           for x, j in enumerate(mine)}
        return revealed

    def _refuse_group(self, r: int, group, reason: str) -> None:
        self.transport.rejections.append({"round": r, "partition_id": None, "node_id": None,
                                          "reason": f"secure aggregation refused the group {list(group)}: {reason}"})
        log.warning("round %d: secure aggregation refused the group %s: %s; its devices are left out",
                    r, list(group), reason)

    def _reject(self, r: int, node: Node, reason: str) -> None:
        self.transport.rejections.append({"round": r, "partition_id": node.partition_id, "node_id": node.node_id,
                                          "reason": f"secure aggregation: {reason}"})
        log.warning("round %d: secure aggregation: client %d: %s", r, node.partition_id, reason)

    def _refuse(self, r: int, reason: str) -> None:
        self.used = 0
        self.transport.rejections.append({"round": r, "partition_id": None, "node_id": None,
                                          "reason": f"secure aggregation refused the round: {reason}"})
        log.warning("round %d: secure aggregation refused the round: %s; the model is unchanged", r, reason)
        return None

    def __call__(self, uploads: list[Upload], r: int) -> Aggregate:
        total = self.total(uploads, r)
        if total is None or not self.used:
            return Aggregate(None, used=0, nbytes=self.nbytes)
        if self.weight <= 0:
            return Aggregate(None, used=0, nbytes=self.nbytes)
        return Aggregate({k: (v / self.weight).astype(np.float32) for k, v in total.items()}, used=self.used,
                         nbytes=self.nbytes)

    def state_dict(self) -> dict:
        return {"ranges": self.ranges.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.ranges = np.asarray(state["ranges"], np.float64)


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
        used, nbytes = getattr(self.inner, "used", None), getattr(self.inner, "nbytes", (0, 0))
        if total is None:  # a refused secure sum releases nothing
            return Aggregate(None, used=0, nbytes=nbytes)
        update = noisy_mean(total, std=z * clip, denominator=self.acc.rate * self.eligible,
                            rng=dp_rng(self.secure_rng, self.seed, Stream.CENTRAL_DP_NOISE, r), template=self.template)
        norms = list(getattr(self.inner, "norms", []))
        done = {"released": True, "norms": norms, "used": used if used is not None else len(uploads),
                "nbytes": nbytes}
        if self.adaptive is None:
            return Aggregate(update, **done)
        share = self.adaptive.update(norms, dp_rng(self.secure_rng, self.seed, Stream.CLIP_COUNT_NOISE, r))
        return Aggregate(update, clip=clip, columns={"dp_clip_norm": clip, "dp_unclipped_share": share}, **done)

    def state_dict(self) -> dict:
        """The adaptive clip norm and the inner sum's state (secure aggregation's ranges)."""
        out = {"inner": self.inner.state_dict()} if hasattr(self.inner, "state_dict") else {}
        return {**out, "adaptive": self.adaptive.state_dict()} if self.adaptive is not None else out

    def load_state_dict(self, state: dict) -> None:
        if "inner" in state:
            self.inner.load_state_dict(state["inner"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])

    @property
    def before_train(self):  # secure aggregation's key exchange, when the sum is secure
        return getattr(self.inner, "before_train", None)


class DistributedDP:
    """Distributed DP around a secure sum (:mod:`fedkd.ddp`): each device clipped its update,
    rounded it onto the sum's grid and added a share of discrete Gaussian noise under the masks,
    so the unmasked sum is already noisy; the server adds nothing and divides it by the expected
    number of participants (q x eligible clients), as :class:`CentralDP` does. A refused round
    releases nothing.

    The grid's ranges are the clip norm (data-independent). With ``adaptive`` (a
    :class:`fedkd.privacy.QuantileClip`), the sum's last coordinate is the noisy count of
    unclipped updates (centred, weighted by ``m``, noised with the rest); the clip, and the grid
    with it, follows it from round to round. The devices get the clip, and the number of
    eligible clients from which they derive the mechanism as the server does, in the train
    message."""

    def __init__(self, inner: SecureSum, setting, *, clip: float, rate: float, eligible: int,
                 adaptive: QuantileClip | None = None) -> None:
        self.inner, self.setting, self.clip, self.rate, self.eligible = inner, setting, clip, rate, eligible
        self.adaptive = adaptive

    @property
    def round_clip(self) -> float:
        return self.adaptive.clip if self.adaptive is not None else self.clip

    def before_train(self, grid: Grid, sent: list[Node], contents, r: int):
        """Secure aggregation's key exchange, with the round's clip as every tensor's range."""
        self.inner.ranges = np.full(len(self.inner.layout), float(self.round_clip))
        out = self.inner.before_train(grid, sent, contents, r)
        for c in contents:
            c.configs["config"].update({"dp-clip": float(self.round_clip), "dp-clients": int(self.eligible)})
        return out

    def __call__(self, uploads: list[Upload], r: int) -> Aggregate:
        clip = self.round_clip
        total = self.inner.total(uploads, r)
        used, nbytes = self.inner.used, self.inner.nbytes
        if total is None:  # a refused secure sum releases nothing
            return Aggregate(None, used=0, nbytes=nbytes)
        update = {k: (np.asarray(v, np.float64) / (self.rate * self.eligible)).astype(np.float32)
                  for k, v in total.items()}
        done = {"released": True, "used": used if used is not None else len(uploads), "nbytes": nbytes}
        if self.adaptive is None:
            return Aggregate(update, **done)
        m = self.setting.count_scale  # each survivor sent m (1 + s_i), s_i = +1 unclipped, -1 clipped
        centred = (float(self.inner.extra[0]) - used * m) / (2 * m) if used else 0.0  # sum_i (b_i - 1/2) + noise
        share = self.adaptive.step(centred)
        return Aggregate(update, clip=clip, columns={"dp_clip_norm": clip, "dp_unclipped_share": share}, **done)

    def state_dict(self) -> dict:
        out = {"inner": self.inner.state_dict()}
        return {**out, "adaptive": self.adaptive.state_dict()} if self.adaptive is not None else out

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])


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
