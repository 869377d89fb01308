"""The CLI refuses bad input before the simulation engine starts, naming what is wrong."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fedkd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_help_explains_every_option():
    out = _fedkd("run", "--help").stdout
    from fedkd.config import ExperimentConfig
    for key in ExperimentConfig.keys():
        assert f"--{key}" in out


def test_bad_value_fails_fast_with_key_and_allowed_values(tmp_path):
    proc = _fedkd("run", "--quant-bits", "7", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "'quant-bits' has invalid value 7: allowed 2, 4, 8 or 32" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_malformed_data_file_is_named_with_its_line(tmp_path):
    bad = tmp_path / "log.csv"
    bad.write_text("user,item,timestamp\n1,10,100\n2,oops,200\n")
    proc = _fedkd("run", "--data-path", str(bad), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "line 3" in proc.stderr and "oops" in proc.stderr


def test_unknown_key_in_an_override_file(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("num-round = 3\n")
    proc = _fedkd("run", "--config", str(f))
    assert proc.returncode == 2 and "Unknown config key 'num-round'" in proc.stderr


def test_resume_without_a_checkpoint_fails_before_the_engine_starts(tmp_path):
    proc = _fedkd("run", "--resume", "--output-dir", str(tmp_path), "--experiment-name", "gone",
                  "--synthetic-users", "50")
    assert proc.returncode == 2
    assert "cannot resume: no checkpoint" in proc.stderr and str(tmp_path / "gone") in proc.stderr


def test_help_explains_resume():
    out = _fedkd("run", "--help").stdout
    assert "--resume [BOOL]" in out and "continues after the last complete round" in " ".join(out.split())


def test_student_width_outside_the_calibration_fails_before_the_engine_starts(tmp_path):
    proc = _fedkd("run", "--student-dim", "64", "--output-dir", str(tmp_path), "--synthetic-users", "50")
    assert proc.returncode == 2
    assert "student width 64 is outside the calibrated widths" in proc.stderr
    assert "starting Flower simulation" not in proc.stderr + proc.stdout
    assert not (tmp_path / "fedkd").exists()  # no results folder was started
