"""``params``: the global student goes down (quantised, nested by width), quantised updates come up.

``kd-weight 0`` makes this FedAvg. The update path is composed from parts: an aggregator
(:mod:`server.aggregation`: weighted mean, secure sum, central DP around a sum), the server
step (:mod:`fedkd.server_opt`), the privacy budget, and teacher refinement from the ensemble
of this round's client models.
"""

from __future__ import annotations

import numpy as np

from fedkd.codec import PayloadError, decode_state, decode_update, encode_state, layout_of
from fedkd.fleet import ensemble_of_states
from fedkd.local import get_state
from fedkd.nested import sub_layout
from server.protocols.base import Protocol
from server.replies import Upload, check_finite
from server.transport import Node
from wire import Content


def secure_part(aggregator):
    """The :class:`server.aggregation.SecureSum` inside an aggregator (alone or under central DP)."""
    return getattr(aggregator, "inner", aggregator)


class ParamsProtocol(Protocol):
    name = "params"

    def __init__(self, cfg, cloud, *, student, fleet, aggregator, server_step, privacy=None, **parts) -> None:
        super().__init__(cfg, cloud, **parts)
        self.student, self.fleet = student, fleet  # student: the torch module (a template for the ensemble)
        self.state = get_state(student)
        self.full_model = fleet.full_model
        self.layout = layout_of(self.state)
        self.aggregator, self.server_step, self.privacy = aggregator, server_step, privacy

    def decode(self, got: Content, node: Node):
        check_finite(got)
        cfg = self.cfg
        if cfg.secure_aggregation:
            masked = got.arrays.get("masked", {}).get("values")
            size = secure_part(self.aggregator).expected_bytes(node.partition_id)
            if masked is None or set(got.arrays) != {"masked"} or masked.dtype != np.uint8 or masked.shape != (size,):
                raise PayloadError("malformed", f"secure aggregation expects only masked/values, uint8 ({size},)")
            return masked
        if set(got.arrays) - {"update"}:
            raise PayloadError("unexpected-key", f"unexpected arrays {sorted(set(got.arrays) - {'update'})}")
        if "update" not in got.arrays:
            raise PayloadError("missing-key", "reply lacks its update ('update')")
        return decode_update(got.arrays["update"], sub_layout(self.full_model, self.fleet.width_of[node.partition_id]),
                             bits=cfg.quant_bits, per_row=cfg.per_row, density=cfg.update_density)

    def absorb(self, uploads: list[Upload], r: int, *, batch=None, released=()) -> dict:
        cols = {}
        fleet_view = self._ensemble(uploads, batch) if self.cloud.refines and uploads else None
        agg = self.aggregator(uploads, r)
        if agg.update is not None:
            self.state = self.server_step.step(self.state, agg.update, r)
        cols.update(self.server_step.columns(r))
        cols["norm_bounded"] = agg.bounded if uploads else 0
        # what really went into the model: a void or refused round aggregates 0
        cols["aggregated"] = agg.used if agg.used is not None else (len(uploads) if agg.update is not None else 0)
        cols["aggregator_bytes"] = agg.nbytes
        if self.cloud.refines:
            cols["teacher_refine_loss"] = self.cloud.refine(batch, fleet_view, r) if fleet_view is not None else ""
        if self.privacy is not None:
            cols.update(self.privacy.record(agg, list(released)))
        return cols

    def _ensemble(self, uploads: list[Upload], batch):
        """FedDF: the averaged predictions of this round's full-width client models on the batch."""
        cfg = self.cfg
        start = decode_state(encode_state(self.state, bits=cfg.student_bits, stochastic=False, per_row=cfg.per_row),
                             self.layout, bits=cfg.student_bits, per_row=cfg.per_row)
        models = [{k: start[k] + u.payload[k] for k in start} for u in uploads
                  if self.fleet.width_of[u.node.partition_id] == cfg.student_dim]
        return ensemble_of_states(self.student, models, batch, temperature=cfg.kd_temperature) if models else None

    def state_dict(self) -> dict:
        out = {**super().state_dict(), "state": self.state, "server_step": self.server_step.state_dict()}
        if hasattr(self.aggregator, "state_dict"):  # secure aggregation's ranges, central DP's adaptive clip
            out["aggregator"] = self.aggregator.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.state = state["state"]
        self.server_step.load_state_dict(state["server_step"])
        if "aggregator" in state:
            self.aggregator.load_state_dict(state["aggregator"])


