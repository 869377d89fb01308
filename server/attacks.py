"""Attacks that measure what a run reveals, run by the ServerApp so that every engine
(``fedkd run``, ``flwr run .``, ``fedkd deploy``) reports them in summary.json.

- membership inference, at the end of the run, on the chosen global student;
- history reconstruction, an observer of what the server decodes in each round (each
  client's update; under secure aggregation only the round's sum), reported at the end.

They read the edge users' histories, which a real server never holds: they are the
experimenter's oracle on a simulated or loopback fleet, not part of the protocol. Neither
changes anything the run computes: the membership attack runs on the model already chosen,
the observer only reads the decoded uploads and draws no random numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fedkd.config import ExperimentConfig
from fedkd.local import set_state
from fedkd.membership import membership_attack
from fedkd.models import build_model
from fedkd.population import population
from fedkd.reconstruction import TABLE, Tally, attack, history_items, popularity_ranking

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


class ReconstructionAttack:
    """History reconstruction (:mod:`fedkd.reconstruction`) on what the server decodes each round.

    Without secure aggregation the server decodes every client's update (central DP clips and
    noises only the released sum, after this): each accepted upload is attacked against its
    client's own training items, and results are averaged per client, then over clients.
    Under secure aggregation the server sees one masked vector per client, unrelated to its
    update; what it can attack is the round's unmasked sum, against the union of that round's
    clients' items (a void round, whose sum the server cannot unmask, is not attacked); results
    are averaged over rounds. With groups (``secagg-group-size``) it learns, and attacks, each
    group's sum. A part of the round loop: its tally is checkpointed.
    """

    name = "reconstruction"

    def __init__(self, cfg: ExperimentConfig, *, secure=None) -> None:
        pop = population(cfg)
        self.sequences, self.clients = pop.dataset.sequences, pop.clients
        self.popular = popularity_ranking(self.sequences, pop.cloud_users, pop.dataset.num_items)
        self.secure = secure  # server.aggregation.SecureSum (its key set and layout) under secure aggregation
        self.tally = Tally()
        self._items: dict[int, np.ndarray] = {}

    def items(self, pids) -> np.ndarray:
        """The distinct training items of these clients together."""
        for p in pids:
            if p not in self._items:
                self._items[p] = history_items(self.sequences, self.clients[p])
        return np.unique(np.concatenate([self._items[p] for p in pids]))

    def observe(self, uploads, r: int) -> None:
        """Attack round ``r``'s accepted uploads, as the server decoded them (called after the
        aggregator ran: under secure aggregation the round's unmasked sum is all there is)."""
        if not uploads:
            return
        if self.secure is None:
            for u in uploads:
                if isinstance(u.payload, Mapping) and TABLE in u.payload:
                    pid = u.node.partition_id
                    self.tally.add(pid, attack(u.payload, self.items([pid]), self.popular))
            return
        if self.secure.last_sum is None:  # the round was refused: the server could not unmask it either
            return
        if self.secure.last_groups:  # groups: the server learns each group's sum, and attacks each
            for x, (pids, sums) in enumerate(self.secure.last_groups):
                self.tally.add(f"{r}.{x}", attack(sums, self.items(sorted(pids)), self.popular))
            return
        self.tally.add(r, attack(self.secure.last_sum, self.items(sorted(u.node.partition_id for u in uploads)),
                                 self.popular))

    def result(self) -> dict:
        """``reconstruction_attack`` for summary.json."""
        if self.secure is None:
            seen = ("each client's decoded update, ranked by its item-table rows' L2 change, top |H| against "
                    "the client's distinct training items H; averaged per client, then over clients")
        elif self.secure.group_size:
            seen = ("secure aggregation in groups (secagg-group-size): each group's unmasked sum, ranked by its "
                    "item-table rows' L2 change, top |H| against the union H of that group's clients' training "
                    "items; averaged over the rounds' groups")
        else:
            seen = ("secure aggregation: only each round's unmasked sum, ranked by its item-table rows' L2 change, "
                    "top |H| against the union H of that round's clients' training items; averaged over rounds")
        observed = ("client-update" if self.secure is None else "group-sum" if self.secure.group_size else "round-sum")
        res = {"observed": observed, "method": seen,
               **self.tally.summary()}
        if res["units"]:
            log.info("history reconstruction (%s): precision@|H| %.4f (popularity %.4f, chance %.4f) over %d %s",
                     res["observed"], res["precision@k"], res["popularity_precision@k"], res["random_precision@k"],
                     res["units"], {"client-update": "clients", "round-sum": "rounds", "group-sum": "groups"}[observed])
        return {"reconstruction_attack": res}

    def state_dict(self) -> dict:
        return self.tally.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tally.load_state_dict(state)


def reconstruction_step(cfg: ExperimentConfig, observer: ReconstructionAttack | None) -> Callable[[dict | None], dict]:
    """The observer's result at the end of the run (or why there is none)."""
    def step(state: dict | None) -> dict:
        if observer is None:
            return {"reconstruction_attack": {"skipped": f"protocol {cfg.protocol} uploads no item-table update "
                                                         "to attack"}}
        return observer.result()
    return step
