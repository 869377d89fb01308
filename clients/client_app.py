"""fedkd ClientApp: unpack a message, call the library, pack the reply.

The same code runs in Flower's simulation engine and on a real SuperNode. The client
knows its own partition (``partition-id`` in node_config) and therefore its own device
tier; the server never sees its private histories, only quantised updates and metrics.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedkd.budget import StepBudget
from fedkd.codec import decode_state, encode_state, layout_of
from fedkd.config import ExperimentConfig
from fedkd.edge import ClientData, client_data
from fedkd.local import get_state, local_train, set_state
from fedkd.metrics import evaluate_ranking
from fedkd.models import build_model
from fedkd.proxy import decode_proxy
from fedkd.wire import Content, config_of, metric_dict, pack, unpack

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_flat(dict(items))


def _setup(context: Context) -> tuple[ExperimentConfig, ClientData]:
    torch.set_num_threads(1)  # one simulated client per worker core
    cfg = _config(tuple(sorted(context.run_config.items())))
    return cfg, client_data(cfg, int(context.node_config["partition-id"]))


def _student(cfg: ExperimentConfig, data: ClientData, content: Content):
    model = build_model(cfg.student_model(data.num_items), seed=None)
    start = decode_state(content.arrays["student"], layout_of(get_state(model)), bits=cfg.quant_bits)
    set_state(model, start)
    return model, start


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server who this node is, so it can sample clients reproducibly."""
    _, data = _setup(context)
    return Message(pack(Content(metrics={"metrics": metric_dict({
        "partition-id": data.partition_id, "tier": data.tier,
        "num-examples": len(data.train[1])})})), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, data = _setup(context)
    content = unpack(msg.content)
    round_idx = int(config_of(content, "config", "round", int))
    model, start = _student(cfg, data, content)
    proxy = None
    if "proxy" in content.arrays:
        proxy = decode_proxy(content.arrays["proxy"], rows=int(config_of(content, "config", "proxy-rows", int)),
                             top_k=cfg.kd_top_k, max_len=cfg.max_len, num_items=data.num_items,
                             bits=cfg.soft_label_bits)
    torch.manual_seed(hash((cfg.seed, 7, round_idx, data.partition_id)) % 2**31)  # dropout masks
    rng = np.random.default_rng([cfg.seed, 6, round_idx, data.partition_id])
    budget = StepBudget(cfg.tiers[data.tier][2])
    result = local_train(model, data.train, proxy, budget=budget, batch_size=cfg.batch_size,
                         kd_batch_size=cfg.kd_batch_size, lr=cfg.local_lr, kd_weight=cfg.kd_weight,
                         temperature=cfg.kd_temperature, rng=rng,
                         optimizer=cfg.local_optimizer, clip_norm=cfg.local_clip_norm or None)
    trained = get_state(model)
    update = {k: trained[k] - start[k] for k in start}
    return Message(pack(Content(
        arrays={"update": encode_state(update, bits=cfg.quant_bits, stochastic=cfg.quant_stochastic, rng=rng)},
        metrics={"metrics": metric_dict({
            "num-examples": result.examples, "steps": result.steps, "step-limit": budget.limit,
            "tier": data.tier, "partition-id": data.partition_id, "loss": result.mean_loss,
            "train-seconds": result.seconds})})), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's own held-out item(s); only metric sums leave the device."""
    cfg, data = _setup(context)
    content = unpack(msg.content)
    split = config_of(content, "config", "split", str)
    if split not in ("valid", "test"):
        raise ValueError(f"unknown evaluation split {split!r}")
    model, _ = _student(cfg, data, content)
    res = evaluate_ranking(model, data.valid if split == "valid" else data.test, k=cfg.eval_k)
    return Message(pack(Content(metrics={"metrics": metric_dict({
        "hr-sum": float(res.per_user_hr.sum()), "ndcg-sum": float(res.per_user_ndcg.sum()),
        "count": res.n, "partition-id": data.partition_id})})), reply_to=msg)
