"""The protocols table: means equal the per-run summaries, the paired comparison uses the same users."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from simulations.protocols_table import build, write_into


def _run(runs: Path, config: str, seed: int, protocol: str, per_user: list[float]) -> dict:
    d = runs / f"{config}-s{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": {"seed": seed}}))
    (d / "metrics.csv").write_text("round,val_ndcg,cum_bytes\n1,0.1,100\n")
    with (d / "test_per_client.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["partition_id", "tier", "count", "hr_sum", "ndcg_sum"])
        for i, v in enumerate(per_user):
            w.writerow([i, 0, 1, float(v > 0), v])
    s = {"protocol": protocol, "test_ndcg@10": float(np.mean(per_user)), "test_hr@10": 0.5,
         "train_bytes_per_round": 2e6, "bytes_up_total": 3e7, "clients_trained": 4}
    (d / "summary.json").write_text(json.dumps(s))
    return s


@pytest.fixture
def folder(tmp_path):
    runs = tmp_path / "protocols"  # a folder of results folders (no sweep.json)
    rng = np.random.default_rng(0)
    base = {s: rng.uniform(0, 0.3, size=40) for s in (0, 1)}
    made = {}
    for s in (0, 1):
        made[("fedkd-frozen", s)] = _run(runs, "fedkd-frozen", s, "params", list(base[s]))
        made[("local", s)] = _run(runs, "local", s, "local", list(base[s] - 0.05))  # worse for every user
    return tmp_path / "protocols", made


def test_table_has_mean_sd_over_seeds_and_a_paired_difference(folder):
    path, made = folder
    table = build(path)
    row = next(line for line in table.splitlines() if line.startswith("| local (local)"))
    vals = [made[("local", s)]["test_ndcg@10"] for s in (0, 1)]
    assert f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}" in row
    assert "-0.0500 [-0.0500, -0.0500]" in row  # every user lost exactly 0.05: the interval is a point
    assert "| 2/2 |" in row and "no model" in row
    assert "reference" in next(line for line in table.splitlines() if line.startswith("| params"))


def test_rewriting_the_doc_replaces_only_the_table(folder, tmp_path):
    path, _ = folder
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nbefore\n")
    write_into(doc, build(path))
    write_into(doc, "new table\n")
    text = doc.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.count("<!-- protocols -->") == 1
    assert "new table" in text and "fedkd-frozen" not in text
