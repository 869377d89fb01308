"""``logits`` (FedMD / DS-FL): models stay on the devices; the server sends distillation targets
on this round's proxy batch and the ids of the next one, and receives the devices' top-k
predictions on it. The fleet's averaged predictions, mixed with the teacher's
(``fd-teacher-weight``), are the next round's targets."""

from __future__ import annotations

from fedkd.codec import PayloadError, pack_ids
from fedkd.fleet import average, densify, predict_dense, top_k
from fedkd.proxy import decode_labels, round_batch, soft_labels
from server.protocols.base import Protocol
from server.replies import Upload, check_finite
from server.transport import Node
from wire import Content


class LogitsProtocol(Protocol):
    name = "logits"

    def __init__(self, cfg, cloud, **parts) -> None:
        super().__init__(cfg, cloud, **parts)
        self.fleet_preds = None  # (round it serves, the fleet's averaged predictions on that round's batch)
        self.next_batch = None

    def targets(self, batch, r: int):
        cfg, teacher = self.cfg, self.cloud.teacher
        if batch is None or cfg.kd_weight == 0:
            return None
        w = cfg.fd_teacher_weight if teacher is not None else 0.0
        fleet = self.fleet_preds[1] if self.fleet_preds is not None and self.fleet_preds[0] == r else None
        if fleet is None:  # first round: nothing from the fleet yet
            return soft_labels(teacher, batch, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k) if w > 0 else None
        if w > 0:
            fleet = w * predict_dense(teacher, batch, temperature=cfg.kd_temperature) + (1 - w) * fleet
        return top_k(fleet, cfg.kd_top_k)

    def content(self, r: int, rows, targets) -> Content:
        content = super().content(r, rows, targets)
        self.next_batch = round_batch(self.cloud.proxy, round_idx=r + 1, size=self.cfg.proxy_batch, seed=self.cfg.seed)
        content.arrays["next"] = {"histories": pack_ids(self.next_batch, self.cloud.num_items)}
        content.configs["config"]["next-rows"] = len(self.next_batch)
        return content

    def decode(self, got: Content, node: Node):
        check_finite(got)
        if "preds" not in got.arrays:
            raise PayloadError("missing-key", "reply lacks its predictions ('preds')")
        cfg = self.cfg
        try:
            return decode_labels(got.arrays["preds"], rows=len(self.next_batch), top_k=cfg.kd_top_k,
                                 num_items=self.cloud.num_items, bits=cfg.soft_label_bits)
        except PayloadError:
            raise
        except ValueError as exc:  # the soft-label decoder's own invariants (ids, probabilities)
            raise PayloadError("malformed", str(exc)) from None

    def absorb(self, uploads: list[Upload], r: int, *, batch=None, released=()) -> dict:
        if uploads:
            self.fleet_preds = (r + 1, average([densify(u.payload, self.cloud.num_items) for u in uploads]))
        cols = {"norm_bounded": 0}
        if self.cloud.refines:
            cols["teacher_refine_loss"] = (self.cloud.refine(self.next_batch, self.fleet_preds[1], r) if uploads
                                           else "")
        return cols

    def state_dict(self) -> dict:
        return {**super().state_dict(), "fleet_preds": self.fleet_preds}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.fleet_preds = state["fleet_preds"]
