"""What the cloud holds: the cloud users' data, the public proxy set, and the teacher.

The server reads cloud users only. The teacher is trained on them (or loaded from the cache)
and, with ``teacher-refine-steps``, keeps learning from the fleet each round (FedDF/FedGKT):
it is fitted to the fleet's predictions on the proxy batch and to its own cloud data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedkd import streams
from fedkd.config import ExperimentConfig
from fedkd.fleet import distill, top_k
from fedkd.local import ProxyBatch
from fedkd.metrics import evaluate_ranking
from fedkd.population import population
from fedkd.proxy import build_proxy_set, round_rows
from fedkd.samples import eval_set, train_samples
from fedkd.streams import Stream
from fedkd.teacher import load_or_train

log = logging.getLogger("fedkd")


class Cloud:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        pop = population(cfg)
        seqs, cloud = pop.dataset.sequences, pop.cloud_users
        self.num_items, self.num_clients = pop.dataset.num_items, pop.num_clients
        self.proxy = self.teacher = self.teacher_opt = None
        self.teacher_info: dict = {}
        if cfg.needs_proxy:
            self.proxy = build_proxy_set(seqs, cloud, size=cfg.proxy_size, max_len=cfg.max_len, seed=cfg.seed)
        if not cfg.needs_teacher:
            return
        self.cloud_train = train_samples([seqs[u][:-2] for u in cloud], cfg.max_len)
        self.cloud_valid = eval_set(seqs, cloud, "valid", cfg.max_len)
        self.teacher, self.teacher_info = load_or_train(
            cfg.teacher_model(self.num_items), cfg.teacher_train(), pop.dataset.fingerprint(),
            self.cloud_train, self.cloud_valid, cache_dir=Path(cfg.cache_dir),
            extra={"cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed},
            progress=lambda row: log.info("teacher epoch %s: loss %.4f, cloud valid NDCG@10 %.4f",
                                          row["epoch"], row["loss"], row["valid_ndcg"]))
        if cfg.teacher_refine_steps:
            self.teacher_opt = torch.optim.Adam(self.teacher.parameters(), lr=cfg.teacher_refine_lr)

    def batch_rows(self, r: int) -> np.ndarray | None:
        """Rows of the proxy set that round ``r`` distils on (None without a proxy set)."""
        if self.proxy is None:
            return None
        return round_rows(len(self.proxy), round_idx=r, size=self.cfg.proxy_batch, seed=self.cfg.seed)

    @property
    def refines(self) -> bool:
        return self.teacher_opt is not None

    def refine(self, histories: np.ndarray, fleet: np.ndarray, r: int) -> float:
        """One FedDF step: fit the teacher to the fleet's predictions, and to its own cloud data."""
        cfg = self.cfg
        t = top_k(fleet, cfg.kd_top_k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(streams.torch_seed(cfg.seed, Stream.TEACHER_REFINE, r))  # dropout masks
            return distill(self.teacher, self.teacher_opt, ProxyBatch(histories, t.ids, t.probs),
                           steps=cfg.teacher_refine_steps, kd_batch_size=cfg.kd_batch_size,
                           temperature=cfg.kd_temperature, rng=streams.rng(cfg.seed, Stream.TEACHER_REFINE, r),
                           private=self.cloud_train, batch_size=cfg.teacher_batch_size)

    def teacher_score(self) -> float:
        """The (refined) teacher's validation NDCG on the cloud users."""
        return evaluate_ranking(self.teacher, self.cloud_valid, k=self.cfg.eval_k).ndcg

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.refines else None,
                "teacher_opt": self.teacher_opt.state_dict() if self.refines else None}

    def load_state_dict(self, state: dict) -> None:
        if state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])
            self.teacher_opt.load_state_dict(state["teacher_opt"])
