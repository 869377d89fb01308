"""``proxy``: no client trains; the server distils the teacher into the student on the whole
proxy set every round (the baseline of a student that never saw an edge user)."""

from __future__ import annotations

import torch

from fedkd import streams
from fedkd.fleet import distill
from fedkd.local import ProxyBatch, get_state, set_state
from fedkd.proxy import soft_labels
from fedkd.streams import Stream
from server.protocols.base import Protocol


class ProxyProtocol(Protocol):
    name = "proxy"
    clients_train = False

    def __init__(self, cfg, cloud, *, student, **parts) -> None:
        super().__init__(cfg, cloud, **parts)
        self.student = student
        self.state = get_state(student)
        sl = soft_labels(cloud.teacher, cloud.proxy, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
        self.labels = ProxyBatch(cloud.proxy, sl.ids, sl.probs)
        self.opt = torch.optim.Adam(student.parameters(), lr=cfg.server_distill_lr)

    def server_round(self, r: int) -> float:
        """The round's training, on the server: returns the mean distillation loss."""
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(streams.torch_seed(cfg.seed, Stream.SERVER_DISTILL, r))
            loss = distill(self.student, self.opt, self.labels, steps=cfg.server_distill_steps,
                           kd_batch_size=cfg.kd_batch_size, temperature=cfg.kd_temperature,
                           rng=streams.rng(cfg.seed, Stream.SERVER_DISTILL, r))
        self.state = get_state(self.student)
        return loss

    def state_dict(self) -> dict:
        return {"state": self.state, "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["state"]
        set_state(self.student, self.state)
        self.opt.load_state_dict(state["opt"])
