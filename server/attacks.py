"""End-of-run measurements of what the chosen model reveals, run by the ServerApp so that every
engine (``fedkd run``, ``flwr run .``, ``fedkd deploy``) reports them.

They read the edge users' histories, which a real server never holds: they are the
experimenter's oracle on a simulated or loopback fleet, not part of the protocol, and they
run after training, on the model already chosen, so they cannot influence it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fedkd.config import ExperimentConfig
from fedkd.local import set_state
from fedkd.membership import membership_attack
from fedkd.models import build_model
from fedkd.population import population

log = logging.getLogger("fedkd")


def membership_step(cfg: ExperimentConfig, out: Path) -> Callable[[dict | None], dict]:
    """Loss-threshold membership inference on the chosen global student (``fedkd.membership``):
    ``mia_auc`` and ``membership_attack`` (details) for summary.json."""
    def step(state: dict | None) -> dict:
        if state is None:
            return {"membership_attack": {"skipped": f"protocol {cfg.protocol} has no global student to attack"}}
        pop = population(cfg)
        model = build_model(cfg.student_model(pop.dataset.num_items), seed=None)
        set_state(model, state)
        users = [int(u) for c in pop.clients for u in c]
        res = membership_attack(model, pop.dataset.sequences, users, cfg.max_len)
        log.info("membership inference (loss threshold): AUC %.4f on %d edge users", res["auc_loss"], res["members"])
        return {"mia_auc": res["auc_loss"], "membership_attack": res}
    return step
