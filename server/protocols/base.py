"""The shared part of every protocol in which clients train: the proxy batch and its targets,
kd-cache, and the ``local`` protocol itself (clients train alone; nothing comes back)."""

from __future__ import annotations

import numpy as np

from fedkd.codec import PayloadError, encode_state
from fedkd.config import ExperimentConfig
from fedkd.nested import slice_state
from fedkd.proxy import (CacheMirror, encode_cached_proxy, encode_full_proxy, encode_proxy, full_distribution,
                         label_digests, soft_labels)
from server.cloud import Cloud
from server.kd_schedule import KDSchedule
from server.replies import Upload, check_finite
from server.transport import Node
from wire import Content


class Protocol:
    """``local``: each client trains its own model; the server sends the proxy batch with the
    teacher's labels (when distilling) and receives metrics only."""

    name = "local"
    clients_train = True
    state: dict | None = None  # the global student's state; None where models stay on devices

    def __init__(self, cfg: ExperimentConfig, cloud: Cloud, *, kd: KDSchedule, **_) -> None:
        self.cfg, self.cloud = cfg, cloud
        self.kd = kd  # distillation weight per round: the experiment's one schedule (it checkpoints it)
        self.mirror = CacheMirror()  # kd-cache: proxy rows and labels each device holds
        self.cache = None  # this round's (rows, histories, labels, label digests) with kd-cache

    def targets(self, batch: np.ndarray | None, r: int):
        """Distillation targets on this round's proxy batch, or None for no distillation."""
        cfg = self.cfg
        if batch is None or self.kd.weight(r) == 0:
            return None
        if cfg.soft_label_format == "full":
            return full_distribution(self.cloud.teacher, batch, temperature=cfg.kd_temperature)
        return soft_labels(self.cloud.teacher, batch, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)

    def content(self, r: int, rows: np.ndarray | None, targets) -> Content:
        """The part of a train message every client of the round shares (its student comes later)."""
        cfg, num_items = self.cfg, self.cloud.num_items
        content = Content(configs={"config": {"round": r}})
        batch = self.cloud.proxy[rows] if rows is not None else None
        self.cache = None
        if targets is not None and cfg.soft_label_format == "full":
            content.arrays["proxy"] = encode_full_proxy(batch, targets, num_items=num_items)
        elif targets is not None:
            content.arrays["proxy"] = encode_proxy(batch, targets, num_items=num_items, bits=cfg.soft_label_bits)
            if cfg.kd_cache:
                self.cache = (rows, batch, targets, label_digests(targets, num_items=num_items,
                                                                  bits=cfg.soft_label_bits))
                content.configs["config"]["proxy-size"] = len(self.cloud.proxy)
        if targets is not None:
            content.configs["config"]["proxy-rows"] = len(batch)
            if self.kd.varies:  # only then: a constant weight is the run config's kd-weight
                content.configs["config"]["kd-weight"] = float(self.kd.weight(r))
        return content

    def for_node(self, node: Node, content: Content) -> Content:
        """kd-cache: the content with its proxy batch cut to what this device does not hold yet."""
        if self.cache is None:
            return content
        rows, batch, labels, digests = self.cache
        need_hist, need_label = self.mirror.delta(node.partition_id, rows, digests)
        arrays = dict(content.arrays)
        arrays["proxy"] = encode_cached_proxy(rows, batch, labels, need_hist, need_label,
                                              proxy_len=len(self.cloud.proxy), num_items=self.cloud.num_items,
                                              bits=self.cfg.soft_label_bits)
        return Content(arrays=arrays, configs=content.configs)

    def delivered(self, sent: list[Node], replied: set[int]) -> None:
        """kd-cache: a reply means the device stored the rows before it trained."""
        if self.cache is None:
            return
        for n in sent:
            if n.partition_id in replied:
                self.mirror.commit(n.partition_id, self.cache[0], self.cache[3])
            else:
                self.mirror.forget(n.partition_id)

    def decode(self, got: Content, node: Node):
        check_finite(got)
        if got.arrays:
            raise PayloadError("unexpected-key", f"protocol {self.name} uploads no arrays, got {sorted(got.arrays)}")
        return None

    def absorb(self, uploads: list[Upload], r: int, *, batch=None, released=()) -> dict:
        """Fold the round's accepted uploads into what the server keeps; returns metrics columns.
        ``batch``: the round's proxy batch (refinement reads the fleet's predictions on it);
        ``released``: the partitions that replied (secure aggregation's unmask step)."""
        return {"norm_bounded": 0}

    def state_dict(self) -> dict:
        return {"mirror": self.mirror}

    def load_state_dict(self, state: dict) -> None:
        self.mirror = state["mirror"]


def contents_by_width(content: Content, state, widths, *, full_model, cfg: ExperimentConfig) -> dict[int, Content]:
    """The content for each student width in use, with that width's slice of ``state`` (one
    encoding per width; no student where ``state`` is None: the models live on the devices)."""
    out = {}
    for w in widths:
        c = Content(arrays=dict(content.arrays), configs={k: dict(v) for k, v in content.configs.items()})
        c.configs["config"]["width"] = w
        if state is not None:
            c.arrays["student"] = encode_state(slice_state(state, full_model, w), bits=cfg.student_bits,
                                               stochastic=False, per_row=cfg.per_row)
        out[w] = c
    return out
