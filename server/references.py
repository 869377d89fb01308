"""End-of-run reference scores: the cloud teacher and item popularity on the edge users.

A student's curve means little without the two numbers it must beat on the same users: the
teacher it distils from (trained on the cloud users only) and the most-popular-items ranking.
Both are scored on the edge users' validation and test items, which a real server never
holds: like the membership attack (``server/attacks.py``) this is the experimenter's oracle on
a simulated or loopback fleet, run after training, so it cannot influence the run. The run's
plot draws the validation scores as reference lines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedkd.config import ExperimentConfig
from fedkd.metrics import evaluate_ranking, score_ranking
from fedkd.popularity import popularity_scorer
from fedkd.population import population
from fedkd.samples import eval_set

log = logging.getLogger("fedkd")


def reference_step(cfg: ExperimentConfig, teacher) -> Callable[[dict | None], dict]:
    """``references`` for summary.json: ``{"teacher": {...}, "popularity": {...}}``, each with
    ``val_ndcg``, ``val_hr``, ``test_ndcg``, ``test_hr`` on every edge user (no teacher entry
    when the run has none, e.g. ``kd-weight 0``). Popularity counts every user's training items."""
    def step(state: dict | None) -> dict:
        pop = population(cfg)
        seqs, k = pop.dataset.sequences, cfg.eval_k
        edge = sorted(int(u) for c in pop.clients for u in c)
        splits = {s: eval_set(seqs, edge, s, cfg.max_len) for s in ("valid", "test")}
        scorers = {"popularity": lambda ev: score_ranking(popularity_scorer([s[:-2] for s in seqs],
                                                                            pop.dataset.num_items), ev, k=k)}
        if teacher is not None:
            scorers = {"teacher": lambda ev: evaluate_ranking(teacher, ev, k=k), **scorers}
        refs = {}
        for name, score in scorers.items():
            v, t = score(splits["valid"]), score(splits["test"])
            refs[name] = {"val_ndcg": v.ndcg, "val_hr": v.hr, "test_ndcg": t.ndcg, "test_hr": t.hr}
            log.info("reference %s on the %d edge users: val NDCG@%d %.4f, test NDCG@%d %.4f", name, len(edge),
                     k, v.ndcg, k, t.ndcg)
        return {"references": refs}
    return step
