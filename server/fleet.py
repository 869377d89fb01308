"""The fleet as the server sees it: device profiles, each device's student width, and the clock.

The server plays the simulated clock: from a device's profile and the bytes of the message it
would receive it plans how many local steps fit the round's deadline, and after the exchange
it recomputes the device's time from the bytes actually sent and received.
"""

from __future__ import annotations

import logging

import numpy as np

from fedkd.config import ExperimentConfig
from fedkd.devices import online
from fedkd.schedule import fleet_profiles, tier_index, width_for
from fedkd.simtime import CALIBRATION, ClientTiming, load_calibration, plan_client, round_seconds, step_seconds
from server.transport import Node, Transport
from wire import Content

log = logging.getLogger("fedkd")


def with_steps(content: Content, steps: int) -> Content:
    return Content(arrays=content.arrays, configs={**content.configs, "config": {**content.configs["config"],
                                                                                "steps": steps}})


class Fleet:
    """Profiles, tiers and widths of the handshaken nodes; plans and clocks their rounds."""

    def __init__(self, cfg: ExperimentConfig, nodes: list[Node], full_model, num_clients: int) -> None:
        self.cfg, self.nodes, self.full_model = cfg, nodes, full_model
        self.profiles = fleet_profiles(cfg, num_clients)
        self.tier_of = {n.partition_id: tier_index(cfg, self.profiles[n.partition_id]) for n in nodes}
        self.width_of = {n.partition_id: width_for(self.profiles[n.partition_id], full_model, cfg.widths)
                         for n in nodes}
        if cfg.protocol != "params":  # models that stay on devices are full width
            self.width_of = {pid: cfg.student_dim for pid in self.width_of}
        self.calibration = load_calibration(cfg.calibration or CALIBRATION)
        self.up_estimate: dict[int, float] = {}  # width -> bytes of the last reply seen at that width
        self.down_size: dict[int, int] = {}  # width -> bytes of a train message at that width (this round)
        self.sim_time = 0.0
        self.trained: set[int] = set()  # partitions whose work was aggregated at least once
        for t, (name, _, _) in enumerate(cfg.tiers):
            ws = sorted({self.width_of[p] or 0 for p, tt in self.tier_of.items() if tt == t})
            log.info("tier %s: %d devices, student width %s", name, sum(1 for tt in self.tier_of.values() if tt == t),
                     ", ".join(str(w) if w else "none (memory too small: never trains)" for w in ws))
        if all(w is None for w in self.width_of.values()):
            raise ValueError("no device's memory holds even the narrowest student: raise tier-memory-mb "
                             "or add narrower student-widths")

    @property
    def widths(self) -> list[int]:
        return sorted({w for w in self.width_of.values() if w is not None})

    @property
    def eligible(self) -> list[int]:
        """Partitions whose memory holds a student: the ones that can ever train."""
        return [p for p, w in self.width_of.items() if w is not None]

    def online(self, r: int) -> list[Node]:
        return [n for n in self.nodes if self.width_of[n.partition_id] is not None
                and online(self.profiles[n.partition_id], self.cfg.seed, r, n.partition_id)]

    def plan(self, nodes: list[Node], by_width: dict[int, Content], transport: Transport) -> dict[int, ClientTiming]:
        """Steps that fit each device's round, from the message it would get and its profile."""
        self.down_size = {}
        return {n.partition_id: self._plan(n, by_width, transport) for n in nodes}

    def _plan(self, node: Node, by_width: dict[int, Content], transport: Transport) -> ClientTiming:
        cfg, pid = self.cfg, node.partition_id
        w = self.width_of[pid]
        max_steps = cfg.tiers[self.tier_of[pid]][2]
        probe = with_steps(by_width[w], max_steps)
        if w not in self.down_size:
            self.down_size[w] = transport.nbytes(probe)
        up = self.up_estimate.get(w, self.down_size[w] - sum(a.nbytes for k, arrs in probe.arrays.items()
                                                               if k != "student" for a in arrs.values()))
        return plan_client(self.profiles[pid], down_bytes=self.down_size[w], up_bytes=up,
                           step_seconds=step_seconds(self.calibration, w), max_steps=max_steps,
                           deadline_s=cfg.round_deadline, min_steps=min(cfg.min_steps, max_steps),
                           policy=cfg.straggler_policy)

    def clock(self, selected: list[Node], plans: dict[int, ClientTiming], sizes: dict[int, tuple[int, int]],
              replied: set[int]) -> tuple[dict[int, ClientTiming], set[int]]:
        """Simulated time of each selected device from the bytes actually sent and received.

        A device whose real reply turned out larger than planned and so missed the deadline
        is late: a straggler like the others, its work not used."""
        cfg, timings, late = self.cfg, {}, set()
        for n in selected:
            pid, plan = n.partition_id, plans[n.partition_id]
            if pid not in sizes or pid not in replied:
                timings[pid] = plan
                continue
            down, up = sizes[pid]
            w = self.width_of[pid]
            self.up_estimate[w] = up
            total = round_seconds(down, up, plan.steps, step_seconds(self.calibration, w), self.profiles[pid])
            timings[pid] = ClientTiming(plan.download_s, plan.compute_s, plan.upload_s, total, plan.steps,
                                        plan.straggler)
            if cfg.round_deadline and total > cfg.round_deadline * (1 + 1e-9):
                late.add(pid)
        return timings, late

    def tier_columns(self, steps: dict[int, list[int]], per_tier: dict[str, list[int]] | None = None) -> dict:
        """metrics.csv's per-tier columns: steps, participants, stragglers, aggregated."""
        out = {}
        for t, (name, _, _) in enumerate(self.cfg.tiers):
            out[f"steps_mean_{name}"] = _mean(steps.get(t, []))
            out[f"steps_max_{name}"] = max(steps.get(t, [0]))
            for key, pids in (per_tier or {"participants": [], "stragglers": [], "aggregated": []}).items():
                out[f"{key}_{name}"] = sum(1 for p in pids if self.tier_of.get(p) == t)
        return out

    def state_dict(self) -> dict:
        return {"sim_time": self.sim_time, "up_estimate": dict(self.up_estimate), "trained": sorted(self.trained)}

    def load_state_dict(self, state: dict) -> None:
        self.sim_time, self.up_estimate = state["sim_time"], dict(state["up_estimate"])
        self.trained = set(state["trained"])


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")
