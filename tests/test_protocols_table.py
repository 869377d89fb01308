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


def test_a_config_run_by_another_sweep_is_included_under_the_tables_name(tmp_path):
    """fedkd-frozen is the convergence sweep's fedkd-c20 (same settings): the table takes those
    runs, names them fedkd-frozen, and pairs the others with them user by user."""
    rng = np.random.default_rng(1)
    base = {s: rng.uniform(0, 0.3, size=30) for s in (0, 1)}
    for s in (0, 1):
        _run(tmp_path / "convergence", "fedkd-c20", s, "params", list(base[s]))
        _run(tmp_path / "convergence", "fedavg-c20", s, "params", list(base[s] - 0.01))
        _run(tmp_path / "protocols", "proxy", s, "proxy", list(base[s] - 0.02))
    table = build(tmp_path / "protocols", include=[f"{tmp_path / 'convergence'}:fedkd-c20=fedkd-frozen"])
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows[0].startswith("| params (fedkd-frozen)") and "reference" in rows[0]
    assert "-0.0200 [-0.0200, -0.0200]" in rows[1] and "fedavg" not in table  # only the config asked for
    assert "--include " in table.splitlines()[0]
    with pytest.raises(SystemExit, match="no runs of config 'nope'"):
        build(tmp_path / "protocols", include=[f"{tmp_path / 'convergence'}:nope=fedkd-frozen"])
    with pytest.raises(SystemExit, match="SWEEP_FOLDER:CONFIG=NAME"):
        build(tmp_path / "protocols", include=["no-colon"])


def test_a_named_section_leaves_the_default_block_alone(folder, tmp_path):
    path, _ = folder
    doc = tmp_path / "results.md"
    doc.write_text("<!-- protocols -->\nthe 20-round table\n<!-- /protocols -->\n")
    write_into(doc, build(path, section="protocols-converged"), "protocols-converged")
    text = doc.read_text()
    assert "the 20-round table" in text and text.count("<!-- protocols-converged -->") == 1
    assert text.index("fedkd-frozen") > text.index("<!-- protocols-converged -->")
    assert "--section protocols-converged`" in text  # the command shown rewrites this block, not the default
    assert "--section" not in build(path).splitlines()[0]
