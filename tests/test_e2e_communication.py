"""Real Flower simulations of the communication features: error feedback in device files,
cached soft labels sent as deltas, sparse updates, naive labels; byte columns vs messages."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedkd.traffic import DOWN_PARTS, UP_PARTS

pytestmark = pytest.mark.slow


def _check_columns(out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    wire = [json.loads(line) for line in (out / "wire.jsonl").open()]  # one line per message
    cum = 0
    for r in rows:
        down = sum(int(r[f"bytes_down_{p}"]) for p in DOWN_PARTS)
        up = sum(int(r[f"bytes_up_{p}"]) for p in UP_PARTS)
        sent = [w["bytes"] for w in wire if w["round"] == int(r["round"]) and w.get("type") == "train"
                and w["direction"] == "down"]
        got = [w["bytes"] for w in wire if w["round"] == int(r["round"]) and w.get("type") == "train"
               and w["direction"] == "up"]
        assert sent and down == int(r["bytes_down"]) == sum(sent)  # every device was sent its message
        assert up == int(r["bytes_up"]) == sum(got)
        cum += down + up
        assert int(r["cum_bytes"]) == cum
    for p in DOWN_PARTS:
        assert int(rows[-1][f"cum_bytes_down_{p}"]) == sum(int(r[f"bytes_down_{p}"]) for r in rows)
    return rows


def test_error_feedback_cache_and_sparse_updates_in_a_real_run(error_feedback_run):
    """(The shared run is a run of the real sweep of tests/conftest.py: ERROR_FEEDBACK, 3 rounds.)"""
    out = error_feedback_run.out
    rows = _check_columns(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_total"] == 0
    # every device kept its residual and its proxy rows in its own folder, not in node state
    runs = list((out / "device-state").glob("run-*"))
    assert len(runs) == 1
    parts = sorted(runs[0].glob("partition-*"))
    assert len(parts) == summary["clients"]
    res = np.load(parts[0] / "ef-residual.npz")
    assert res.files and any(np.abs(res[k]).max() > 0 for k in res.files)
    cache = np.load(parts[0] / "proxy-cache.npz")
    assert sorted(cache["rows"].tolist()) == list(range(64))
    # round 1 sends every history and label; later rounds (same 64 rows, frozen teacher) only row numbers
    first, later = rows[0], rows[1:]
    n = int(first["participants"])
    assert int(first["bytes_down_soft_labels"]) > 40 * n
    for r in later:
        assert int(r["bytes_down_soft_labels"]) < int(first["bytes_down_soft_labels"]) / 5
        assert int(r["bytes_down_proxy_inputs"]) < int(first["bytes_down_proxy_inputs"]) / 3
    # the upload does not grow across rounds: no residual rides along
    assert len({r["bytes_up"] for r in rows}) == 1


def test_naive_soft_labels_are_float32_distributions_over_every_item(naive_labels_local_dp):
    """(The shared run, the seed-0 run of the real sweep of tests/conftest.py, also has local DP
    on, for test_privacy_e2e: it changes the updates sent up, not the labels sent down.)"""
    out = naive_labels_local_dp.out
    rows = _check_columns(out)
    assert len(rows) == 2
    from fedkd.config import ExperimentConfig
    from fedkd.population import population

    cfg = ExperimentConfig.from_flat(json.loads((out / "config.json").read_text())["config"])
    assert cfg.soft_label_format == "full"
    items = population(cfg).dataset.num_items
    for row in rows:  # the whole proxy batch every round: no cache for full distributions
        per_client = int(row["bytes_down_soft_labels"]) / int(row["participants"])
        assert 64 * items * 4 <= per_client < 64 * items * 4 + 1000  # the array and its framing
