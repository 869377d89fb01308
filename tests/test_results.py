"""Results folders: nothing already written is ever lost."""

import json

import pytest

import numpy as np

from fedkd.results import CsvLog, prepare_dir, read_metrics, state_digest, write_json


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


def test_state_digest_is_float32_bytes_in_key_order_and_read_back_as_text(tmp_path):
    a = {"w": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones(2, dtype=np.float32)}
    d = state_digest(a)
    assert len(d) == 16 and int(d, 16) >= 0
    assert state_digest(dict(reversed(list(a.items())))) == d  # insertion order does not matter
    assert state_digest({k: v.astype(np.float32) for k, v in a.items()}) == d  # float32 bytes
    assert state_digest({**a, "b": np.array([1.0, 1.0 + 1e-6], dtype=np.float32)}) != d
    assert state_digest(None) == ""
    log = CsvLog(tmp_path / "m.csv")
    log.append({"round": 1, "model_digest": "1234567890123456"})  # only digits, still text
    log.append({"round": 2, "model_digest": ""})
    assert [r["model_digest"] for r in read_metrics(tmp_path / "m.csv")] == ["1234567890123456", ""]
