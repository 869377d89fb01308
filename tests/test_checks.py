"""fedkd.checks.check_experiment: every feasibility check, Flower-free, before any engine starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedkd.checks import check_experiment
from fedkd.config import ExperimentConfig

SMALL = {"synthetic-users": 50, "synthetic-items": 80}


def cfg(tmp_path: Path, **kw) -> ExperimentConfig:
    flat = {**SMALL, "output-dir": str(tmp_path / "out"), "cache-dir": str(tmp_path / "cache")}
    flat.update({k.replace("_", "-"): v for k, v in kw.items()})
    return ExperimentConfig.from_flat(flat)


def test_the_default_small_experiment_passes_and_reports_its_layout(tmp_path):
    plan = check_experiment(cfg(tmp_path))
    assert (plan.num_cloud_users, plan.num_edge_users, plan.num_clients) == (10, 40, 40)
    assert plan.trainable == 40 and 0 < plan.proxy_rows <= 2048 and plan.cloud_prefixes >= plan.proxy_rows
    assert "the proxy set has" in plan.notes[0]  # fewer prefixes than proxy-size: said, not hidden
    assert "40 clients" in plan.describe()
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # reads only


def test_the_checks_do_not_import_flower(tmp_path):
    import subprocess
    code = ("import sys; from fedkd.checks import check_experiment; from fedkd.config import ExperimentConfig; "
            f"check_experiment(ExperimentConfig(synthetic_users=50, output_dir={str(tmp_path)!r})); "
            "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules), 'flwr imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("kw, message", [
    ({"clients_per_round": 100000},
     "Config key 'clients-per-round' has invalid value 100000: allowed 0 (every client) or 1..40 (this fleet has "
     "40 clients)."),
    ({"min_replies": 11, "clients_per_round": 10},
     "Config key 'min-replies' has invalid value 11: allowed 1..10: at most the clients a round selects (10); "
     "with more, every round would be skipped."),
    ({"fault_malicious": "3,40"},
     "Config key 'fault-malicious' has invalid value '3,40': allowed partition ids in 0..39 (this fleet has 40 "
     "clients)."),
    ({"student_dim": 64},
     "student width 64 is outside the calibrated widths"),
    ({"tier_memory_mb": "0.001"},
     "no device's memory holds even the narrowest student: raise tier-memory-mb or add narrower student-widths"),
    ({"kd_top_k": 81}, "Config key 'kd-top-k' has invalid value 81: allowed at most the 80 items of synthetic"),
    ({"resume": True}, "cannot resume: no checkpoint"),
    ({"device_trace": "/nonexistent/trace.csv"}, "/nonexistent/trace.csv: trace file not found"),
])
def test_what_the_fleet_and_the_files_cannot_do_is_refused(tmp_path, kw, message):
    with pytest.raises(ValueError) as err:
        check_experiment(cfg(tmp_path, **kw))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_clients_per_round_equal_to_the_fleet_is_fine(tmp_path):
    assert check_experiment(cfg(tmp_path, clients_per_round=40)).num_clients == 40


def test_a_cloud_without_training_histories_is_refused_when_distillation_needs_it(tmp_path):
    rows = "".join(f"{u},{i},{i}\n" for u in range(5) for i in range(1, 4))  # everyone has exactly 3 items
    data = tmp_path / "log.csv"
    data.write_text("user,item,timestamp\n" + rows)
    with pytest.raises(ValueError) as err:
        check_experiment(cfg(tmp_path, data_path=str(data)))
    assert str(err.value) == (
        "Config key 'cloud-fraction' has invalid value 0.2: allowed a share that gives the cloud training "
        "histories (its 1 cloud users have no training prefix (a user needs at least 4 interactions: "
        "leave-one-out holds out two); the teacher trains on them and the proxy set is drawn from them); raise "
        "cloud-fraction, or set kd-weight 0 for a run without a teacher.")
    plan = check_experiment(cfg(tmp_path, data_path=str(data), kd_weight=0.0))  # FedAvg needs no cloud data
    assert plan.proxy_rows == 0 and plan.num_clients == 4


def test_partial_memory_counts_the_devices_that_train(tmp_path):
    plan = check_experiment(cfg(tmp_path, tier_memory_mb="0.001,64"))
    assert plan.trainable == 20 and any("never train" in n for n in plan.notes)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match=r"'output-dir' has invalid value .*: allowed a folder name \(.* is a file\)"):
        check_experiment(cfg(tmp_path))


def test_dp_calibration_runs_before_the_engine(tmp_path):
    plan = check_experiment(cfg(tmp_path, dp_mode="central", dp_target_epsilon=4.0, clients_per_round=10))
    assert plan.trainable == 40
