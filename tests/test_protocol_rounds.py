"""Every protocol through the server's whole round loop (handshake, rounds, test, summary) and the
real ClientApp, in this process: the grid answers each message by calling the ClientApp, as
tests/test_large_fleets.py's does. No Flower engine, so every protocol fits in the fast suite.

Why: the protocols the shared end-to-end runs do not use (``local``, ``proxy``) had no run in
the suite, and ``local`` broke unnoticed when the round loop began passing ``absorb`` the round's
proxy batch (it surfaced in the protocols sweep at converged settings, 2026-11-30).
"""

from __future__ import annotations

import csv
import json

import pytest

from fedkd.config import ExperimentConfig
from fedkd.population import population
from server.experiment import Experiment
from test_large_fleets import _Grid, _flower_identity  # noqa: F401 (the fixture stamps messages)

TINY = {"synthetic-users": 40, "synthetic-items": 60, "synthetic-mean-length": 8, "num-rounds": 2,
        "teacher-epochs": 1, "clients-per-round": 6, "progress": False, "membership-attack": False}


@pytest.mark.parametrize("protocol", ["params", "logits", "local", "proxy"])
def test_every_protocol_runs_its_rounds_and_the_test(protocol, tmp_path):
    flat = {**TINY, "protocol": protocol, "output-dir": str(tmp_path), "experiment-name": protocol,
            "cache-dir": str(tmp_path / "cache"), **({"kd-weight": 0.0} if protocol == "local" else {})}
    cfg = ExperimentConfig.from_flat(flat)
    out = tmp_path / protocol
    out.mkdir()
    grid = _Grid(population(cfg).num_clients, run_config=flat)
    summary = Experiment(cfg, out).run(grid)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert 0 <= summary["test_ndcg@10"] <= 1 and json.loads((out / "summary.json").read_text())["protocol"] == protocol
    trained = sum(int(r["aggregated"]) for r in rows)
    assert trained == 0 if protocol == "proxy" else trained > 0  # proxy: no device trains
