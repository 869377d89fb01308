"""fedkd ClientApp: unpack a message, call the library, pack the reply.

The same code runs in Flower's simulation engine and on a real SuperNode. The client
knows its own partition (``partition-id`` in node_config) and therefore its own device
tier; the server never sees its private histories, only quantised updates, top-k
predictions on public proxy rows (logit protocol) and metrics.

With the ``logits`` and ``local`` protocols the model never leaves the device: it lives in
``context.state``, which Flower keeps per node across rounds (in simulation and on a
SuperNode alike). Larger per-device memory (error-feedback residuals, cached proxy rows and
soft labels) lives in device-local files instead (:func:`clients.node.store`), because node state travels
with every message in simulation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from clients.mods import TRAIN_MODS
from clients.mods.update import finish
from clients.mods.usage import usage_mod
from clients.node import fingerprint, round_of, setup, store
from clients.profile import profile_mod
from fedkd import streams
from fedkd.budget import StepBudget
from fedkd.codec import decode_state, decode_update, encode_update, layout_of, unpack_ids
from fedkd.config import ExperimentConfig
from fedkd.edge import ClientData
from fedkd.feedback import encode_with_feedback
from fedkd.local import get_state, local_train, set_state
from fedkd.metrics import evaluate_ranking
from fedkd.models import build_model
from fedkd.nested import embed, sub_config, sub_layout
from fedkd.privacy import distributed_for, dp_rng
from fedkd.proxy import decode_cached_proxy, decode_full_proxy, decode_proxy, encode_labels, soft_labels
from fedkd import ddp, secagg
from fedkd.streams import Stream
from wire import Content, config_of, from_record, metric_dict, pack, to_record, unpack

# Outermost around every handler: the device's own time and memory (a node config's usage-log),
# then timestamps per message (only with FEDKD_PROFILE_DIR set, for simulations.deploy_bench).
app = ClientApp(mods=[usage_mod, profile_mod])


def _proxy(cfg: ExperimentConfig, data: ClientData, content: Content, context: Context):
    """The round's proxy batch with its soft labels, in the configured format; with kd-cache
    the rows this device already holds come from its own storage, and the new ones are stored
    before training (the server counts them as held once this device replies)."""
    arrays, rows = content.arrays["proxy"], int(config_of(content, "config", "proxy-rows", int))
    if cfg.soft_label_format == "full":
        return decode_full_proxy(arrays, rows=rows, max_len=cfg.max_len, num_items=data.num_items)
    if not cfg.kd_cache:
        return decode_proxy(arrays, rows=rows, top_k=cfg.kd_top_k, max_len=cfg.max_len,
                            num_items=data.num_items, bits=cfg.soft_label_bits)
    device = store(cfg, context, data.partition_id)
    proxy, cache = decode_cached_proxy(arrays, device.load("proxy-cache"), rows=rows,
                                       proxy_len=int(config_of(content, "config", "proxy-size", int)),
                                       top_k=cfg.kd_top_k, max_len=cfg.max_len, num_items=data.num_items,
                                       bits=cfg.soft_label_bits)
    device.save("proxy-cache", cache)
    return proxy


def _student(cfg: ExperimentConfig, data: ClientData, content: Content):
    """The student this device was sent: the global one, or its nested slice of the width the
    server chose for this device's memory (HeteroFL)."""
    width = int(config_of(content, "config", "width", int))
    if width not in cfg.widths:
        raise ValueError(f"width {width} is not one of student-widths {cfg.widths}")
    model = build_model(sub_config(cfg.student_model(data.num_items), width), seed=None)
    start = decode_state(content.arrays["student"], layout_of(get_state(model)), bits=cfg.student_bits,
                         per_row=cfg.per_row)
    set_state(model, start)
    return model, start


_SCORERS: OrderedDict[tuple, torch.nn.Module] = OrderedDict()  # this worker's decoded students to score with
_SCORERS_KEPT = 8  # one per student width of an evaluation, and the validation's and the test's models


def _student_to_score(cfg: ExperimentConfig, data: ClientData, content: Content):
    """The student an evaluate message carries, decoded once per worker process and kept.

    Why: every evaluate message of one evaluation carries the same bytes (the server encodes
    one student per width and shares it), and scoring one held-out item costs less than
    decoding the student and building its model (measured: 2.4 ms of the handler's 2.8 ms per
    message), so a test through 100,000 clients would mostly rebuild the same model. The key
    is a digest of the bytes with the width and the config, so a new round's student, another
    width or another run's settings are decoded afresh; scoring leaves the model unchanged
    (``evaluate_ranking`` runs it in eval mode without gradients). Training does not use it:
    it changes its model.
    """
    digest = hashlib.blake2b(digest_size=16)
    for key, arr in sorted(content.arrays["student"].items()):
        digest.update(f"{key}:{arr.dtype.str}:{arr.shape};".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    key = (cfg, data.num_items, config_of(content, "config", "width", int), digest.hexdigest())
    model = _SCORERS.get(key)
    if model is None:
        model = _SCORERS[key] = _student(cfg, data, content)[0]
        while len(_SCORERS) > _SCORERS_KEPT:
            _SCORERS.popitem(last=False)
    else:
        _SCORERS.move_to_end(key)
    return model


def _own_model(cfg: ExperimentConfig, data: ClientData, context: Context):
    """This device's model: kept in its state, or the shared seeded initialisation at first."""
    model = build_model(cfg.student_model(data.num_items), seed=cfg.seed)
    if "student" in context.state.array_records:
        set_state(model, from_record(context.state.array_records["student"]))
    return model


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server who this node is, so it can sample clients reproducibly, and what its data
    is (its fingerprint), so it can refuse a device whose data is not the fleet's."""
    cfg, data = setup(context)
    configs = {"fingerprint": fingerprint(context, cfg, data).as_dict()}  # checked by the server (fedkd.shards)
    if cfg.secure_aggregation:
        configs["secagg"] = {"enc-key": _encryption_key(context).public_bytes}
    return Message(pack(Content(configs=configs, metrics={"metrics": metric_dict({
        "partition-id": data.partition_id, "tier": data.tier,
        "num-examples": len(data.train[1])})})), reply_to=msg)


def _kd_weight(cfg: ExperimentConfig, content: Content) -> float:
    """This round's distillation weight: the server's (``kd-schedule``) when it sends one."""
    if "kd-weight" in content.configs.get("config", {}):
        return float(config_of(content, "config", "kd-weight", (int, float)))
    return cfg.kd_weight


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Train on the private data from what the server sent; reply with the update, or with the
    logit protocol's predictions. Faults and privacy act around this, as mods (clients/mods/)."""
    cfg, data = setup(context)
    content = unpack(msg.content)
    round_idx = int(config_of(content, "config", "round", int))
    if cfg.stateful_clients:
        model, start = _own_model(cfg, data, context), None
    else:
        model, start = _student(cfg, data, content)
    proxy = _proxy(cfg, data, content, context) if "proxy" in content.arrays else None
    torch.manual_seed(streams.torch_seed(cfg.seed, Stream.LOCAL_DROPOUT, round_idx, data.partition_id))
    rng = streams.rng(cfg.seed, Stream.LOCAL_TRAIN, round_idx, data.partition_id)  # then the update's rounding
    # The server plays the clock in simulation: it sends how many steps fit this device's
    # round (its tier's budget, cut by the deadline); the meter enforces exactly that.
    budget = StepBudget(int(config_of(content, "config", "steps", int)))
    result = local_train(model, data.train, proxy, budget=budget, batch_size=cfg.batch_size,
                         kd_batch_size=cfg.kd_batch_size, lr=cfg.local_lr, kd_weight=_kd_weight(cfg, content),
                         temperature=cfg.kd_temperature, rng=rng,
                         optimizer=cfg.local_optimizer, clip_norm=cfg.local_clip_norm or None)
    trained = get_state(model)
    arrays = {}
    if start is None:
        context.state["student"] = to_record(trained)
    else:  # the update as the mods want it sent (clients.mods.update.finish)
        update = finish({k: trained[k] - start[k] for k in start})
        if cfg.secure_aggregation:
            arrays["masked"] = {"values": _masked(cfg, data, content, context, update, round_idx, rng,
                                                  result.examples)}
        else:
            arrays["update"] = _encode_update(cfg, update, rng, context, data.partition_id)
    if "next" in content.arrays:  # logit protocol: predictions on the next public batch
        arrays["preds"] = _predictions(cfg, data, content, model)
    return Message(pack(Content(arrays=arrays, metrics={"metrics": metric_dict({
        "num-examples": result.examples, "steps": result.steps, "step-limit": budget.limit,
        "tier": data.tier, "partition-id": data.partition_id, "loss": result.mean_loss,
        "train-seconds": result.seconds})})), reply_to=msg)


def _predictions(cfg: ExperimentConfig, data: ClientData, content: Content, model) -> dict:
    """The logit protocol's upload: this device's top-k soft labels on the next public batch."""
    rows = int(config_of(content, "config", "next-rows", int))
    hist = unpack_ids(content.arrays["next"]["histories"], (rows, cfg.max_len), data.num_items)
    preds = soft_labels(model, hist, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
    return encode_labels(preds, num_items=data.num_items, bits=cfg.soft_label_bits)


def _encode_update(cfg: ExperimentConfig, update: dict, rng: np.random.Generator, context: Context,
                   partition_id: int) -> dict:
    """Quantise (and sparsify) the update; with error feedback, add the residual this device
    kept from its last upload and keep the new one in its own storage."""
    def encode(u):
        return encode_update(u, bits=cfg.quant_bits, stochastic=cfg.quant_stochastic, rng=rng,
                             per_row=cfg.per_row, density=cfg.update_density)
    if not cfg.error_feedback:
        return encode(update)
    layout = layout_of(update)
    device = store(cfg, context, partition_id)
    arrays, residual = encode_with_feedback(
        update, device.load("ef-residual"), encode=encode,
        decode=lambda a: decode_update(a, layout, bits=cfg.quant_bits, per_row=cfg.per_row,
                                       density=cfg.update_density))
    device.save("ef-residual", residual)
    return arrays


def _encryption_key(context: Context) -> secagg.KeyPair:
    """This device's long-term X25519 key for the shares it receives (fedkd.secagg, step 0): made
    once, kept in the node state, its public half sent with the handshake; never revealed."""
    rec = context.state.config_records.get("secagg-enc")
    if rec is None:
        keys = secagg.KeyPair.generate()
        context.state["secagg-enc"] = ConfigRecord({"private": keys.private_bytes()})
        return keys
    return secagg.KeyPair.from_private_bytes(rec["private"])


def _kept(context: Context, round_idx: int) -> ConfigRecord:
    rec = context.state.config_records.get("secagg")
    if rec is None or int(rec["round"]) != round_idx:
        raise ValueError(f"secure aggregation: no shared secrets of round {round_idx} on this device")
    return rec


def _shared(rec: ConfigRecord) -> secagg.Shared:
    return secagg.Shared(ids=[int(i) for i in rec["ids"]], t=int(rec["t"]), b=rec["b"], s=rec["s"],
                         own_b=rec["own-b"], own_s=rec["own-s"], reply=b"")


def _key_list(blob: bytes, n: int) -> list[bytes]:
    if len(blob) != n * secagg.KEY_BYTES:
        raise ValueError(f"expected {n} keys of {secagg.KEY_BYTES} bytes, got {len(blob)} bytes")
    return [blob[i * secagg.KEY_BYTES:(i + 1) * secagg.KEY_BYTES] for i in range(n)]


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1: fresh seeds for the self mask and the mask key pair, Shamir-shared
    among the devices the server lists (the round's, or under SecAgg+ this device's neighbourhood)
    and encrypted for each; the seeds stay in this node's state, the mask public key and the
    ciphertexts go to the server, which routes them but cannot read them."""
    _, data = setup(context)
    content = unpack(msg.content)
    round_idx = int(config_of(content, "config", "round", int))
    t = int(config_of(content, "config", "threshold", int))  # the round's: distributed DP's noise counts on it
    share_t = int(config_of(content, "config", "share-threshold", int)) \
        if "share-threshold" in content.configs["config"] else t
    ids = [int(i) for i in content.configs["peers"]["ids"]]
    enc_keys = _key_list(content.configs["peers"]["keys"], len(ids))
    shared = secagg.share(_encryption_key(context), data.partition_id, ids, enc_keys, share_t, round_idx)
    kept = {"round": round_idx, "ids": ids, "enc-keys": b"".join(enc_keys), "t": share_t, "b": shared.b,
            "s": shared.s, "own-b": shared.own_b, "own-s": shared.own_s}
    if share_t != t:
        kept["round-t"] = t
    context.state["secagg"] = ConfigRecord(kept)
    return Message(pack(Content(configs={"secagg": {"shares": shared.reply}})), reply_to=msg)


def _masked(cfg: ExperimentConfig, data: ClientData, content: Content, context: Context, update: dict,
            round_idx: int, rng: np.random.Generator, examples: int) -> np.ndarray:
    """Secure aggregation, step 2: the update (already clipped by ``secagg_clipping_mod`` if
    central DP is on), at full width, weighted by its examples over the round's reference count
    when the server sends one (no DP: the server divides the sum by the survivors' weights, as
    the plain weighted mean does), quantised on the round's shared grid and masked in the ring
    sized for the round's devices, bit-packed."""
    rec = _kept(context, round_idx)
    if "secagg-examples" in content.configs["config"]:
        w = examples / float(config_of(content, "config", "secagg-examples", float))
        update = {k: v * w for k, v in update.items()}
    full = cfg.student_model(data.num_items)
    width = int(config_of(content, "config", "width", int))
    padded = embed(update, full, width)[0] if width != cfg.student_dim else update
    ranges = np.asarray(content.configs["config"]["secagg-ranges"], np.float64)
    everyone = [int(i) for i in content.configs["peers"]["ids"]]  # the round's holders: the ring's headroom
    near = {int(i) for i in rec["ids"]}  # those it shared with: its masks and step 3 concern only them
    mask_keys = {j: key for j, key in zip(everyone, _key_list(content.configs["peers"]["keys"], len(everyone)))
                 if j in near}
    holders = sorted(mask_keys)
    rec["mask-keys"] = b"".join(mask_keys[j] for j in holders)  # step 3 needs them
    rec["holders"] = holders
    bits = secagg.code_bits(cfg.quant_bits)
    layout = sub_layout(full, cfg.student_dim)
    if cfg.dp_mode == "distributed":
        t = int(rec["round-t"]) if "round-t" in rec else int(rec["t"])
        codes, k = _noised(cfg, data, content, layout, padded, len(everyone), t, round_idx, rng)
    else:
        k = secagg.ring_bits(len(holders) if cfg.secagg_group_size else len(everyone), bits)  # a group: its own sum
        codes = secagg.quantize(padded, layout, ranges, bits, rng, stats=cfg.dp_mode != "central",
                                norm_cap=cfg.dp_clip_norm if cfg.dp_mode == "central" else None)
    return secagg.pack_ring(secagg.mask(codes, data.partition_id, rec["b"], rec["s"], mask_keys, k, round_idx), k)


def _noised(cfg: ExperimentConfig, data: ClientData, content: Content, layout: dict, update: dict, holders: int,
            t: int, round_idx: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Distributed DP (fedkd.ddp): the update clipped, conditionally rounded onto the grid, with the
    unclipped bit under adaptive clipping, plus this device's discrete Gaussian share for ``t``
    guaranteed survivors, reduced into the ring sized for ``holders`` codes and their noise.

    The mechanism comes from the run config and the number of eligible clients the server names,
    which only a calibrated noise (``dp-target-epsilon`` without ``dp-noise-multiplier``) depends
    on. The clip is its own ``dp-clip-norm``, or under adaptive clipping the server's round clip
    (public: it follows the released noisy counts); the grid scales with the clip, so the noise
    over the sensitivity does not depend on it."""
    setting = distributed_for(cfg, int(config_of(content, "config", "dp-clients", int)),
                              sum(secagg.sizes_of(layout)))[1]
    clip = float(config_of(content, "config", "dp-clip", float)) if cfg.dp_clip_adaptive else cfg.dp_clip_norm
    noise_rng = dp_rng(cfg.dp_secure_rng, cfg.seed, Stream.DISTRIBUTED_DP_NOISE, round_idx, data.partition_id)
    ints, _ = ddp.encode(update, layout, clip=clip, bits=setting.bits, rng=rng, noise_rng=noise_rng,
                         share_std=setting.share_std(t), count_scale=setting.count_scale)
    k = secagg.ring_bits(holders, setting.bits, noise_bound=setting.noise_bound(holders, t), top=setting.top())
    return np.mod(ints, 1 << k).astype(np.uint64), k


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 3: the server names the survivors and hands over the ciphertexts
    this device was sent in step 1; it reveals, per device, a share of the self-mask seed (a
    survivor) or of the mask-key seed (a dropout), never both, and nothing below the threshold."""
    _, data = setup(context)
    content = unpack(msg.content)
    round_idx = int(config_of(content, "config", "round", int))
    rec = _kept(context, round_idx)
    if "holders" not in rec:
        raise ValueError("secure aggregation: this device sent no masked update this round")
    kept, holders = _shared(rec), [int(i) for i in rec["holders"]]
    peers = content.configs["peers"]
    senders = [int(j) for j in peers["from"]]
    blob = peers["shares"]
    if len(blob) != len(senders) * secagg.CIPHER_BYTES:
        raise ValueError("secure aggregation: malformed ciphertexts")
    cts = {j: blob[x * secagg.CIPHER_BYTES:(x + 1) * secagg.CIPHER_BYTES] for x, j in enumerate(senders)}
    mask_keys = dict(zip(holders, _key_list(rec["mask-keys"], len(holders))))
    shares = secagg.reveal(_encryption_key(context), data.partition_id, kept,
                           _key_list(rec["enc-keys"], len(kept.ids)), mask_keys,
                           [int(j) for j in peers["survivors"]], cts, round_idx)
    del context.state["secagg"]  # one reveal per round
    return Message(pack(Content(configs={"secagg": {"shares": b"".join(shares[j] for j in holders)}})),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's own held-out item(s); only metric sums leave the device.

    ``splits`` may name both validation and test, so that protocols whose models stay on
    the devices can report the test score of the round later chosen on validation.
    """
    cfg, data = setup(context)
    content = unpack(msg.content)
    splits = str(config_of(content, "config", "splits", str)).split(",")
    if not splits or any(s not in ("valid", "test") for s in splits):
        raise ValueError(f"unknown evaluation splits {splits!r}")
    if "student" in content.arrays:
        model = _student_to_score(cfg, data, content)
    else:
        model = _own_model(cfg, data, context)
    out: dict[str, float | int] = {"partition-id": data.partition_id}
    for split in splits:
        res = evaluate_ranking(model, data.valid if split == "valid" else data.test, k=cfg.eval_k)
        out.update({f"{split}-hr-sum": float(res.per_user_hr.sum()),
                    f"{split}-ndcg-sum": float(res.per_user_ndcg.sum()), f"{split}-count": res.n})
    return Message(pack(Content(metrics={"metrics": metric_dict(out)})), reply_to=msg)
