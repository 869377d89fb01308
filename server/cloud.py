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
from fedkd.proxy import build_proxy_set, round_rows, soft_labels
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

    def warm_start(self, student: torch.nn.Module) -> dict:
        """Distil the teacher into the global student before round 1, on the server.

        The student starts where the cloud's knowledge is instead of at random: the same KD loss
        the devices use, on the whole proxy set (and, with ``warm-start-cloud``, the cloud users'
        own samples). It costs no messages and reads only the cloud's data.
        """
        cfg = self.cfg
        sl = soft_labels(self.teacher, self.proxy, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
        opt = torch.optim.Adam(student.parameters(), lr=cfg.server_distill_lr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(streams.torch_seed(cfg.seed, Stream.WARM_START))
            loss = distill(student, opt, ProxyBatch(self.proxy, sl.ids, sl.probs), steps=cfg.warm_start_steps,
                           kd_batch_size=cfg.kd_batch_size, temperature=cfg.kd_temperature,
                           rng=streams.rng(cfg.seed, Stream.WARM_START),
                           private=self.cloud_train if cfg.warm_start_cloud else None,
                           batch_size=cfg.teacher_batch_size)
        info = {"steps": cfg.warm_start_steps, "loss": loss,
                "cloud_val_ndcg": evaluate_ranking(student, self.cloud_valid, k=cfg.eval_k).ndcg}
        log.info("warm start: %d distillation steps on the server, loss %.4f, cloud valid NDCG@%d %.4f",
                 info["steps"], loss, cfg.eval_k, info["cloud_val_ndcg"])
        return info

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
