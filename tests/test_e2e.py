"""Real Flower simulations (ServerApp + ClientApps on the Ray engine), 2 rounds, small fleet.

Runs the CLI in a subprocess, as a user would, so Ray starts and stops cleanly per run. Where
a test needs a run that a golden case already is (the default experiment, the logit protocol,
the mixed fleet),
it reads that case's results folder (``golden``, tests/conftest.py) instead of running its own.
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_runs import ROOT, Run

pytestmark = pytest.mark.slow


def _short_end(run: Run) -> None:
    """A run ends with a few lines; the whole summary stays in summary.json."""
    lines = run.stdout.strip().splitlines()
    assert len(lines) <= 15 and lines[-1].startswith(f"results: {run.out} "), run.stdout


def test_two_rounds_write_a_complete_results_folder(golden, dp_rerun):
    run = golden["default"]  # 50 synthetic users, 80 items, 2 rounds: this test's experiment
    _short_end(run)
    out = run.out
    for name in ("config.json", "metrics.csv", "summary.json", "metrics_vs_round.png", "student.pt", "student.json",
                 "metrics_vs_bytes.png", "test_per_client.csv", "wire.jsonl", "run.log", "rejections.jsonl",
                 "timing.csv", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert not (out / "processes.json").exists()  # `fedkd run` leaves no Flower process behind to record
    # the README's results table names every file a default run writes
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| file | what it holds |"):readme.index("Running again moves the previous folder")]
    assert [p.name for p in sorted(out.iterdir()) if f"`{p.name}`" not in table] == []
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clients"] == 40  # 50 users, 20% in the cloud, one user per client
    for r in rows:
        assert int(r["participants"]) == int(r["aggregated"]) == 40
        assert int(r["bytes_down"]) > 0 and int(r["bytes_up"]) > 0
        # default tiers weak=4 steps, strong=16: every client spent exactly its tier's budget
        assert float(r["steps_mean_weak"]) == float(r["steps_max_weak"]) == 4
        assert float(r["steps_mean_strong"]) == float(r["steps_max_strong"]) == 16
        assert 0.0 <= float(r["val_ndcg"]) <= float(r["val_hr"]) <= 1.0
    assert summary["test_users"] == 40
    assert 0.0 <= summary["mia_auc"] <= 1.0 and summary["membership_attack"]["members"] == 40  # from the ServerApp
    # the reference lines of the plot: teacher and popularity on the same edge users
    refs = summary["references"]
    assert set(refs) == {"teacher", "popularity"}
    for ref in refs.values():
        assert 0.0 < ref["val_ndcg"] <= ref["val_hr"] <= 1.0 and 0.0 < ref["test_ndcg"] <= ref["test_hr"] <= 1.0
    assert refs["teacher"] != refs["popularity"]
    assert (out / "rejections.jsonl").read_text() == ""
    assert summary["teacher"]["cached"] is False
    assert summary["train_bytes_total"] == sum(int(r["bytes_down"]) + int(r["bytes_up"]) for r in rows)
    per_client = list(csv.DictReader((out / "test_per_client.csv").open()))
    assert sorted(int(r["partition_id"]) for r in per_client) == list(range(40))
    # which model the test score is: the 8-bit student the devices received; student.pt's own score beside it
    assert summary["test_model"].startswith("the global student of round 2 as the devices received it (8-bit)")
    assert "student.pt" in summary["test_model_float32"]
    assert 0 < summary["test_ndcg@10_float32"] <= summary["test_hr@10_float32"] <= 1
    assert abs(summary["test_ndcg@10_float32"] - summary["test_ndcg@10"]) < 0.1  # the same student, rounded
    assert any(line.startswith("student.pt as saved (float32") for line in run.stdout.splitlines())
    # a second run reuses the cached teacher and moves the old results aside, never deleting them
    # (dp_rerun: a run over a copy of an earlier run of its experiment, with the same cache)
    again = dp_rerun.out
    _short_end(dp_rerun)
    assert json.loads((again / "summary.json").read_text())["teacher"]["cached"] is True
    assert len(list(again.parent.glob(f"{again.name}.old-*"))) == 1


def test_logit_protocol_keeps_models_on_devices_and_refines_the_teacher(golden):
    """Logit-only FD with teacher refinement: no model crosses the wire in either direction,
    the devices' models persist between rounds in Flower's node state, and the teacher moves.
    The golden case logits-refine is this experiment (protocol logits, 5 refinement steps a
    round at lr 0.01, 2 rounds)."""
    run = golden["logits-refine"]
    _short_end(run)
    out = run.out
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "logits" and summary["rejected_total"] == 0
    # Evaluation messages carry no model: if node state were lost between rounds every client
    # would score the same seeded initial model each time and validation could never change.
    assert len({r["val_ndcg"] for r in rows}) > 1
    wire = [json.loads(line) for line in (out / "wire.jsonl").open()]  # one line per message
    evals = [w for w in wire if w["type"] == "evaluate"]
    trains = [w for w in wire if w["type"] == "train"]
    assert evals and trains
    assert all(w["arrays"] == {} for w in evals)
    assert all(sorted(w["arrays"]) == (["next", "proxy"] if w["direction"] == "down" else ["preds"])
               for w in trains)
    assert all(w["bytes"] < 1000 for w in evals if w["direction"] == "down")  # a config, no model
    # the refined teacher changes: its cloud validation score is not frozen at the cached teacher's
    assert all(r["teacher_refine_loss"] != "" for r in rows)
    assert summary["teacher_cloud_val_ndcg_final"] != pytest.approx(summary["teacher"]["best_valid_ndcg"], abs=1e-9)
    # no global student, so no student.pt and no float32 score: the test score is the devices' own models'
    assert summary["test_model"].startswith("each device's own model at round") and "test_ndcg@10_float32" not in summary
    assert not (out / "student.pt").exists()


def test_mixed_fleet_with_a_trace_deadlines_and_nested_widths(golden):
    """A trace decides who is online each round; weak devices train a width-4 slice and fit
    fewer steps under the deadline; simulated time adds up round by round. Aggregated with the
    coordinate-wise trimmed mean, ring by ring of the nested widths (the robust aggregation
    that test_reliability_e2e's faulty run, now the golden case, no longer uses). The golden
    case nested-deadline is this experiment (tests/e2e_runs.py)."""
    run = golden["nested-deadline"]
    _short_end(run)
    out = run.out
    metrics = list(csv.DictReader((out / "metrics.csv").open()))
    summary = json.loads((out / "summary.json").read_text())
    assert [int(r["online"]) for r in metrics] == [38, 39]  # client 0 joins in round 2, client 1 never
    assert sum(float(r["sim_round_s"]) for r in metrics) == pytest.approx(summary["sim_time_s"])
    assert all(0 < float(r["sim_round_s"]) <= 0.6 for r in metrics)
    weak, strong = summary["tiers"]["weak"], summary["tiers"]["strong"]
    assert weak["widths"] == [4] and strong["widths"] == [16]
    assert all(float(r["steps_max_weak"]) < float(r["steps_max_strong"]) == 16 for r in metrics)
    assert weak["aggregated"] + weak["stragglers"] == weak["participants"] == 19 + 20
    assert "test_ndcg@10_full_width" in summary and (out / "test_per_client_full_width.csv").is_file()
    assert json.loads((out / "config.json").read_text())["config"]["aggregation"] == "trimmed-mean"
    assert summary["test_model"].endswith("(8-bit, each device its width), scored on the devices")
    # handshake registration-order: 5 nodes asked (and any registered in the same microsecond as
    # another), the others placed by the engine's order; the golden files show nothing else changed
    asked = [ln for ln in map(json.loads, (out / "wire.jsonl").open()) if ln["type"] == "query" and ln["direction"] == "down"]
    assert 5 <= len(asked) < 40 and "placed by it" in (out / "run.log").read_text()


def test_a_finished_run_exports_its_student_for_devices(golden, tmp_path):
    """The chosen student is saved with the results and `fedkd export` turns it into an ONNX file
    whose top-10 equals the PyTorch student's on the run's own users. (A copy of the golden
    default run: the export writes into the results folder.)"""
    out = tmp_path / "exp"
    shutil.copytree(golden["default"].out, out)
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "export", str(out)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    from fedkd.export import Recommender
    from fedkd.models import ModelConfig, build_model

    cfg = ModelConfig(**json.loads((out / "student.json").read_text()))
    model = build_model(cfg, seed=None)
    model.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    model.eval()
    rec = Recommender(out / "export" / "student.onnx")
    hist = torch.randint(1, cfg.num_items + 1, (20, cfg.max_len))
    with torch.no_grad():
        scores = model(hist)[:, 1:]
    ids, _ = rec.topk(hist.numpy(), k=10)  # nothing excluded, like the raw scores below
    expected = (scores.topk(10, dim=1).indices + 1).numpy()
    assert (ids == expected).mean() > 0.95  # equal up to float ties
