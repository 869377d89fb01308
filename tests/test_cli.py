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


def test_a_run_ends_with_a_few_lines_not_the_whole_summary(tmp_path):
    import json

    from simulations.end_of_run import MAX_LINES, summary_lines
    summary = {"experiment": "x", "protocol": "params", "clients": 40, "clients_trained": 38, "rounds": 3,
               "best_round": 2, "best_val_ndcg": 0.05, "test_hr@10": 0.175, "test_ndcg@10": 0.1049,
               "test_ndcg@10_full_width": 0.11, "test_hr@10_full_width": 0.2, "test_users": 40,
               "train_bytes_total": 497227, "train_bytes_per_round": 165742.3, "bytes_down_total": 400000,
               "bytes_up_total": 97227, "wall_seconds": 12.3, "sim_time_s": 0.49, "stragglers_total": 2,
               "rejected_total": 0, "teacher": {"cached": False, "seconds": 4.2, "history": [{"epoch": 1}] * 40},
               "dp_epsilon": 4.42, "privacy": {"mode": "central", "delta": 1e-05, "noise_multiplier": 1.0,
                                               "rate": 0.25, "stopped": None},
               "mia_auc": 0.469, "data": {"duplicates_dropped": 80, "short_rows_dropped": 0},
               "reconstruction_attack": {"observed": "client-update", "units": 20, "precision@k": 0.9012,
                                         "popularity_precision@k": 0.2031, "random_precision@k": 0.1625}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = summary_lines(tmp_path)
    assert len(lines) <= MAX_LINES
    assert lines == [
        "fedkd x: protocol params, 40 clients (38 trained), 3 rounds",
        "test HR@10 0.1750, NDCG@10 0.1049 on 40 users: the model of round 2 (best validation NDCG@10 0.0500)",
        "test of the full-width student on every user: HR@10 0.2000, NDCG@10 0.1100",
        "bytes: 0.40 MB down, 0.10 MB up; 0.50 MB of training traffic (0.17 MB a round)",
        "time: 12.3 s wall (teacher trained in 4.2 s); simulated device time 0.5 s",
        "privacy: dp-mode central, epsilon 4.42 at delta 1e-05, noise multiplier 1, sampling rate 0.25",
        "membership-inference attack AUC 0.4690 (0.5 = no better than a coin)",
        "history reconstruction from updates: precision@|history| 0.9012 (popularity 0.2031, chance 0.1625)",
        "reliability: 2 stragglers (rejections.jsonl, metrics.csv)",
        "data: 80 exact duplicate rows dropped, 0 rows of short users dropped",
        f"results: {tmp_path} (everything in summary.json, metrics.csv, run.log)",
    ]


def _parsers():
    """Every parser of the `fedkd` command line: the top level, each subcommand, calibrate's own."""
    import argparse

    from simulations.calibrate import parser as calibrate_parser
    from simulations.cli import build_parser

    todo, seen = [build_parser()], [calibrate_parser()]
    while todo:
        p = todo.pop()
        seen.append(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return seen


def test_no_parser_abbreviates_and_every_help_states_a_default_once():
    parsers = _parsers()
    assert len(parsers) >= 12
    for p in parsers:
        assert p.allow_abbrev is False, p.prog
        formatter = p._get_formatter()
        for action in p._actions:
            if action.help:
                text = formatter._expand_help(action)
                assert text.count("(default:") <= 1 and "(default: None)" not in text, (p.prog, text)


def test_an_unknown_option_gets_the_subcommands_usage_and_a_suggestion(capsys):
    import pytest

    from simulations.cli import main
    for argv, usage, message in [
        (["deploy", "local", "--nodes", "2", "--num-round", "2"], "usage: fedkd deploy local ",
         "fedkd deploy local: error: unrecognized option --num-round (options are never abbreviated); did you "
         "mean --num-rounds?"),
        (["data", "x.csv", "--data-fromat", "csv"], "usage: fedkd data ",
         "fedkd data: error: unrecognized option --data-fromat; did you mean --data-format?"),
        (["calibrate", "--widht", "4"], "usage: fedkd calibrate ",
         "fedkd calibrate: error: unrecognized option --widht; did you mean --widths?"),
        (["report", "--metric=x", "dir"], "usage: fedkd report ",
         "fedkd report: error: unrecognized option --metric (options are never abbreviated); did you mean "
         "--metrics?"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(usage) and err.strip().splitlines()[-1] == message, err
