"""Results folders: nothing already written is ever lost."""

import json

import pytest

from fedkd.results import CsvLog, prepare_dir, read_metrics, write_json


def test_existing_results_are_moved_aside_not_overwritten(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "metrics.csv").write_text("round\n1\n")
    moved = prepare_dir(out)
    assert moved is not None and (moved / "metrics.csv").read_text() == "round\n1\n"
    assert out.is_dir() and not any(out.iterdir())
    (out / "x").write_text("again")
    moved2 = prepare_dir(out)
    assert moved2 != moved and (moved2 / "x").read_text() == "again"


def test_csv_rows_are_on_disk_after_each_append_and_columns_are_fixed(tmp_path):
    log = CsvLog(tmp_path / "m.csv")
    log.append({"round": 1, "ndcg": 0.5})
    assert read_metrics(tmp_path / "m.csv") == [{"round": 1.0, "ndcg": 0.5}]
    log.append({"round": 2, "ndcg": 0.25})
    assert [r["round"] for r in read_metrics(tmp_path / "m.csv")] == [1.0, 2.0]
    with pytest.raises(ValueError):
        log.append({"round": 3, "surprise": 1})


def test_write_json_leaves_no_temporary_file(tmp_path):
    write_json(tmp_path / "s.json", {"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
