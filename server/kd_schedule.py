"""How much the students distil from the teacher in each round (``kd-schedule``).

A teacher trained on few cloud users helps a student that is still below it and holds back
one that has passed it (docs/screening.md: under FedAdam the student passes the teacher's
edge validation by round ~14 at 20% cloud users, and distillation adds nothing after). So
the weight can decay over rounds, or be *gated*: full weight until the global student
passes the teacher, then zero for good. The gate compares both on the one split the server
may read without asking any device, the cloud users' validation items: that costs no
messages and no privacy, and the teacher was selected on exactly that split, so the
student has to beat the teacher's best side of it.

A round with weight 0 sends no proxy batch at all (the protocol's ``targets`` is None), so
switching distillation off also saves its bytes.
"""

from __future__ import annotations

import logging

import torch

from fedkd.config import ExperimentConfig
from fedkd.local import set_state
from fedkd.metrics import evaluate_ranking
from server.cloud import Cloud

log = logging.getLogger("fedkd")


class KDSchedule:
    def __init__(self, cfg: ExperimentConfig, cloud: Cloud, student: torch.nn.Module | None = None) -> None:
        self.cfg, self.cloud, self.student = cfg, cloud, student
        self.schedule = effective_schedule(cfg)
        self.gated_at: int | None = None  # round after whose validation the gate closed
        self.teacher_val: float | None = None

    @property
    def varies(self) -> bool:
        """Whether the weight can change during the run (then it travels in each train message)."""
        return self.schedule != "constant" and self.cfg.kd_weight > 0

    def weight(self, r: int) -> float:
        """Distillation weight of round ``r`` (rounds count from 1)."""
        cfg, base = self.cfg, self.cfg.kd_weight
        if base == 0 or self.schedule == "constant":
            return base
        if self.schedule == "linear":
            return base * max(0.0, 1.0 - (r - 1) / cfg.kd_decay_rounds)
        if self.schedule == "exp":
            return base * 0.5 ** ((r - 1) / cfg.kd_decay_rounds)
        return 0.0 if self.gated_at is not None and r > self.gated_at else base  # gate

    def observe(self, r: int, state: dict | None) -> dict:
        """Round ``r``'s metrics columns: the weight when it varies and, with the gate, the
        comparison that may close it (``state`` is the validated student; None in a round
        without validation, whose gate columns stay empty)."""
        cols = {"kd_weight": self.weight(r)} if self.varies else {}
        if self.schedule != "gate" or self.cfg.kd_weight == 0:
            return cols
        if state is None:
            return {**cols, "student_cloud_val_ndcg": "", "teacher_cloud_val_ndcg": ""}
        if self.teacher_val is None or self.cloud.refines:  # a refined teacher moves
            self.teacher_val = self.cloud.teacher_score()
        set_state(self.student, state)
        student_val = evaluate_ranking(self.student, self.cloud.cloud_valid, k=self.cfg.eval_k).ndcg
        if self.gated_at is None and student_val > self.teacher_val:
            self.gated_at = r
            log.info("kd gate: after round %d the student passes the teacher on the cloud users' validation "
                     "(NDCG@%d %.4f > %.4f); distillation off from round %d", r, self.cfg.eval_k, student_val,
                     self.teacher_val, r + 1)
        return {**cols, "student_cloud_val_ndcg": student_val, "teacher_cloud_val_ndcg": self.teacher_val}

    def state_dict(self) -> dict:
        return {"gated_at": self.gated_at, "teacher_val": self.teacher_val}

    def load_state_dict(self, state: dict) -> None:
        self.gated_at, self.teacher_val = state["gated_at"], state["teacher_val"]


def effective_schedule(cfg: ExperimentConfig) -> str:
    """The schedule a protocol can follow: all of them under params; under local every one but
    the gate (it scores a global student, which local lacks); under logits and proxy, whose
    targets the server builds itself, the constant kd-weight."""
    if cfg.protocol == "params" or (cfg.protocol == "local" and cfg.kd_schedule != "gate"):
        return cfg.kd_schedule
    return "constant"
