"""fedkd ClientApp: unpack a message, call the library, pack the reply.

The same code runs in Flower's simulation engine and on a real SuperNode. The client
knows its own partition (``partition-id`` in node_config) and therefore its own device
tier; the server never sees its private histories, only quantised updates, top-k
predictions on public proxy rows (logit protocol) and metrics.

With the ``logits`` and ``local`` protocols the model never leaves the device: it lives in
``context.state``, which Flower keeps per node across rounds (in simulation and on a
SuperNode alike). Larger per-device memory (error-feedback residuals, cached proxy rows and
soft labels) lives in device-local files instead (:func:`_store`), because node state travels
with every message in simulation.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedkd import streams
from fedkd.budget import StepBudget
from fedkd.codec import decode_state, decode_update, encode_update, layout_of, unpack_ids
from fedkd.config import FAULT_KINDS, ExperimentConfig
from fedkd.edge import ClientData, client_data
from fedkd.faults import HANG_MARGIN_S, corrupt, draw_fault, malicious_ids
from fedkd.feedback import DeviceStore, device_folder, encode_with_feedback
from fedkd.local import get_state, local_train, set_state
from fedkd.metrics import evaluate_ranking
from fedkd.models import build_model
from fedkd.nested import embed, sub_config, sub_layout
from fedkd.privacy import clip_update, local_dp
from fedkd.proxy import decode_cached_proxy, decode_full_proxy, decode_proxy, encode_labels, soft_labels
from fedkd.secagg import KeyPair, masked_upload
from fedkd.streams import Stream
from wire import Content, config_of, from_record, garble, metric_dict, pack, to_record, unpack

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_flat(dict(items))


def _setup(context: Context) -> tuple[ExperimentConfig, ClientData]:
    """This node's config and data: the run config, with the device's own ``data-path`` if its
    node config names one (``flower-supernode --node-config "partition-id=0 data-path=..."``)."""
    torch.set_num_threads(1)  # one simulated client per worker core
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<i> num-partitions=<n>\" (i in 0..n-1, "
                         "n = the fleet size; see docs/devices.md)")
    run_config = dict(context.run_config)
    if "data-path" in node:  # the device's own copy of the (same) interaction file
        run_config["data-path"] = str(node["data-path"])
    cfg = _config(tuple(sorted(run_config.items())))
    return cfg, client_data(cfg, int(node["partition-id"]))


def _store(cfg: ExperimentConfig, context: Context, partition_id: int) -> DeviceStore:
    """This device's own folder for this run.

    A real device names its storage in its node config (``flower-supernode --node-config
    "partition-id=0 state-dir=/var/lib/fedkd"``). In simulation every device is a worker
    process on the machine that runs the server, so the default is the results folder
    (``<output-dir>/<experiment-name>/device-state/``): a new run of the experiment moves the
    old folder aside and starts with empty devices, and what the devices kept can be
    inspected afterwards.
    """
    base = context.node_config.get("state-dir")
    if not base:
        base = (Path(cfg.output_dir).expanduser().resolve() / cfg.experiment_name / "device-state")
    return DeviceStore(device_folder(str(base), context.run_id, partition_id))


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
    store = _store(cfg, context, data.partition_id)
    proxy, cache = decode_cached_proxy(arrays, store.load("proxy-cache"), rows=rows,
                                       proxy_len=int(config_of(content, "config", "proxy-size", int)),
                                       top_k=cfg.kd_top_k, max_len=cfg.max_len, num_items=data.num_items,
                                       bits=cfg.soft_label_bits)
    store.save("proxy-cache", cache)
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


def _own_model(cfg: ExperimentConfig, data: ClientData, context: Context):
    """This device's model: kept in its state, or the shared seeded initialisation at first."""
    model = build_model(cfg.student_model(data.num_items), seed=cfg.seed)
    if "student" in context.state.array_records:
        set_state(model, from_record(context.state.array_records["student"]))
    return model


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server who this node is, so it can sample clients reproducibly."""
    _, data = _setup(context)
    return Message(pack(Content(metrics={"metrics": metric_dict({
        "partition-id": data.partition_id, "tier": data.tier,
        "num-examples": len(data.train[1])})})), reply_to=msg)


def _kd_weight(cfg: ExperimentConfig, content: Content) -> float:
    """This round's distillation weight: the server's (``kd-schedule``) when it sends one."""
    if "kd-weight" in content.configs.get("config", {}):
        return float(config_of(content, "config", "kd-weight", (int, float)))
    return cfg.kd_weight


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, data = _setup(context)
    content = unpack(msg.content)
    round_idx = int(config_of(content, "config", "round", int))
    fault = draw_fault(cfg, round_idx, data.partition_id)  # injected faults (docs/reliability.md)
    if fault == "crash":
        raise RuntimeError(f"injected fault: client {data.partition_id} crashes in round {round_idx} (fault-crash)")
    if fault == "hang":  # the server stops waiting at round-timeout; this reply arrives too late
        time.sleep(cfg.round_timeout + HANG_MARGIN_S)
    if cfg.stateful_clients:
        model, start = _own_model(cfg, data, context), None
    else:
        model, start = _student(cfg, data, content)
    proxy = _proxy(cfg, data, content, context) if "proxy" in content.arrays else None
    torch.manual_seed(streams.torch_seed(cfg.seed, Stream.LOCAL_DROPOUT, round_idx, data.partition_id))
    rng = streams.rng(cfg.seed, Stream.LOCAL_TRAIN, round_idx, data.partition_id)
    # The server plays the clock in simulation: it sends how many steps fit this device's
    # round (its tier's budget, cut by the deadline); the meter enforces exactly that.
    budget = StepBudget(int(config_of(content, "config", "steps", int)))
    result = local_train(model, data.train, proxy, budget=budget, batch_size=cfg.batch_size,
                         kd_batch_size=cfg.kd_batch_size, lr=cfg.local_lr, kd_weight=_kd_weight(cfg, content),
                         temperature=cfg.kd_temperature, rng=rng,
                         optimizer=cfg.local_optimizer, clip_norm=cfg.local_clip_norm or None)
    trained = get_state(model)
    arrays = {}
    if start is not None:
        update = {k: trained[k] - start[k] for k in start}
        if cfg.dp_mode == "local":  # clip and noise the real update, before quantisation (docs/privacy.md)
            update = local_dp(update, cfg, streams.rng(cfg.seed, Stream.LOCAL_DP_NOISE, round_idx, data.partition_id))
        if data.partition_id in malicious_ids(cfg):  # a well-formed lie: the update, boosted (after any clipping)
            update = {k: (v * cfg.fault_malicious_scale).astype(np.float32) for k, v in update.items()}
        if cfg.secure_aggregation:
            arrays["masked"] = {"values": _masked(cfg, data, content, context, update, round_idx)}
        else:
            arrays["update"] = _encode_update(cfg, update, rng, context, data.partition_id)
    else:
        context.state["student"] = to_record(trained)
    if "next" in content.arrays:  # logit protocol: predictions on the next public batch
        rows = int(config_of(content, "config", "next-rows", int))
        hist = unpack_ids(content.arrays["next"]["histories"], (rows, cfg.max_len), data.num_items)
        preds = soft_labels(model, hist, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
        arrays["preds"] = encode_labels(preds, num_items=data.num_items, bits=cfg.soft_label_bits)
    uploaded = sorted(arrays)[:1]  # the record a corruption hits: 'update' or 'preds'
    if fault in FAULT_KINDS and uploaded:
        arrays[uploaded[0]] = corrupt(arrays[uploaded[0]], fault)
    steps = result.steps + (budget.limit + 1 - result.steps if fault == "steps" else 0)  # a lie about work done
    rd = pack(Content(arrays=arrays, metrics={"metrics": metric_dict({
        "num-examples": result.examples, "steps": steps, "step-limit": budget.limit,
        "tier": data.tier, "partition-id": data.partition_id, "loss": result.mean_loss,
        "train-seconds": result.seconds})}))
    if fault == "undecodable" and uploaded:
        garble(rd, uploaded[0])
    return Message(rd, reply_to=msg)


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
    store = _store(cfg, context, partition_id)
    arrays, residual = encode_with_feedback(
        update, store.load("ef-residual"), encode=encode,
        decode=lambda a: decode_update(a, layout, bits=cfg.quant_bits, per_row=cfg.per_row,
                                       density=cfg.update_density))
    store.save("ef-residual", residual)
    return arrays


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1: a fresh X25519 key pair for this round; the private half
    stays in this node's state, the public half goes to the server to be handed to the peers."""
    _, data = _setup(context)
    round_idx = int(config_of(unpack(msg.content), "config", "round", int))
    keys = KeyPair.generate()
    context.state["secagg"] = ConfigRecord({"round": round_idx, "private": keys.private_bytes()})
    return Message(pack(Content(arrays={"secagg": {"public": np.frombuffer(keys.public_bytes, np.uint8).copy()}},
                                metrics={"metrics": metric_dict({"partition-id": data.partition_id})})),
                   reply_to=msg)


def _masked(cfg: ExperimentConfig, data: ClientData, content: Content, context: Context, update: dict,
            round_idx: int) -> np.ndarray:
    """Secure aggregation, step 2: the update (clipped here if central DP is on: the server
    cannot clip what it cannot see), at full width, in fixed point under pairwise masks."""
    rec = context.state.config_records.get("secagg")
    if rec is None or int(rec["round"]) != round_idx:
        raise ValueError(f"secure aggregation: no key pair of round {round_idx} on this device")
    if cfg.dp_mode == "central":
        update, _ = clip_update(update, cfg.dp_clip_norm)
    full = cfg.student_model(data.num_items)
    width = int(config_of(content, "config", "width", int))
    padded = embed(update, full, width)[0] if width != cfg.student_dim else update
    peers = content.arrays["peers"]
    return masked_upload(padded, sub_layout(full, cfg.student_dim), KeyPair.from_private_bytes(rec["private"]),
                         data.partition_id, peers["ids"].tolist(), peers["keys"], round_idx)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's own held-out item(s); only metric sums leave the device.

    ``splits`` may name both validation and test, so that protocols whose models stay on
    the devices can report the test score of the round later chosen on validation.
    """
    cfg, data = _setup(context)
    content = unpack(msg.content)
    splits = str(config_of(content, "config", "splits", str)).split(",")
    if not splits or any(s not in ("valid", "test") for s in splits):
        raise ValueError(f"unknown evaluation splits {splits!r}")
    if "student" in content.arrays:
        model, _ = _student(cfg, data, content)
    else:
        model = _own_model(cfg, data, context)
    out: dict[str, float | int] = {"partition-id": data.partition_id}
    for split in splits:
        res = evaluate_ranking(model, data.valid if split == "valid" else data.test, k=cfg.eval_k)
        out.update({f"{split}-hr-sum": float(res.per_user_hr.sum()),
                    f"{split}-ndcg-sum": float(res.per_user_ndcg.sum()), f"{split}-count": res.n})
    return Message(pack(Content(metrics={"metrics": metric_dict(out)})), reply_to=msg)
