"""Wire audit: the summary of a wire log, and the private-history checker (which must be able to fail)."""

import numpy as np
import pytest

from fedkd.audit import find_history, format_summary, id_streams, summarise
from fedkd.codec import encode_state, pack_ids

N = 80
PRIVATE = {3: np.array([5, 17, 42, 8, 8, 63, 12, 77, 30, 2]), 9: np.array([1, 2, 3, 4, 5, 6, 7])}


@pytest.mark.parametrize("encode", [
    lambda s: s.astype(np.int64), lambda s: s.astype(np.uint16), lambda s: s.astype(np.float32),
    lambda s: pack_ids(s, N), lambda s: np.concatenate([np.zeros(3, np.uint8), pack_ids(s, N)]),
    lambda s: np.concatenate([np.ones(1, np.uint16), s.astype(np.uint16)]).view(np.uint8)])
def test_the_checker_finds_a_history_however_it_is_encoded(encode):
    arrays = {"array:update/codes": encode(np.concatenate([[0, 0], PRIVATE[3], [0]]))}
    found = find_history(arrays, PRIVATE, num_items=N, window=6)
    assert found and {f["user"] for f in found} == {3}


def test_a_history_inside_packed_proxy_rows_is_found_at_any_bit_offset():
    rows = np.zeros((4, 12), np.int64)
    rows[2, 2:] = PRIVATE[3]
    assert find_history({"p": pack_ids(rows, N)}, PRIVATE, num_items=N, window=6)


def test_public_sequences_and_short_runs_are_not_findings():
    # user 9's run 1..7 is also a public (cloud) sequence: the cloud may send it
    arrays = {"a": np.arange(1, 8, dtype=np.int64), "b": PRIVATE[3][:5].astype(np.int64)}  # 5 < window
    assert find_history(arrays, PRIVATE, num_items=N, public=[np.arange(1, 9)], window=6) == []


def test_a_quantised_update_carries_no_history():
    rng = np.random.default_rng(0)
    state = {"item_emb": rng.normal(size=(N + 1, 16)).astype(np.float32), "b": rng.normal(size=16).astype(np.float32)}
    arrays = {f"update/{k}": v for k, v in encode_state(state, bits=8, stochastic=True, rng=rng).items()}
    assert find_history(arrays, PRIVATE, num_items=N, window=6) == []


def test_id_streams_cut_values_outside_the_catalogue():
    s = id_streams(np.array([1, 500, 3], np.int64), N)[0]
    assert s.tolist() == [1, -1, 3]


def test_summary_per_direction_and_type():
    lines = [{"direction": "down", "type": "train", "bytes": 100,
              "arrays": {"student": {"codes": ["uint8", [10]]}}, "configs": {"config": {"round": "int"}}, "metrics": {}},
             {"direction": "down", "type": "train", "bytes": 120,
              "arrays": {"student": {"codes": ["uint8", [12]]}}, "configs": {"config": {"round": "int"}}, "metrics": {}},
             {"direction": "up", "type": "train", "bytes": 50, "arrays": {"update": {"codes": ["uint8", [10]]}},
              "configs": {}, "metrics": {"metrics": ["loss", "steps"]}},
             {"direction": "up", "type": "train", "bytes": 0, "error": "boom"}]
    rows = summarise(lines)
    assert [(r["direction"], r["type"], r["messages"], r["bytes"], r["errors"]) for r in rows] == [
        ("down", "train", 2, 220, 0), ("up", "train", 2, 50, 1)]
    assert rows[0]["arrays"] == {"student/codes": ["uint8[10]", "uint8[12]"]}
    assert rows[1]["metrics"] == ["metrics/loss", "metrics/steps"]
    text = format_summary(rows)
    assert "| down | train | 2 | 0 | 0.000 | 100 | 120 |" in text and "`update/codes`" in text


def test_summary_reads_an_old_per_exchange_log():
    old = [{"round": 1, "type": "train", "messages_down": 40, "bytes_down": 4000, "replies": 39, "bytes_up": 900,
            "arrays_down": ["proxy", "student"], "arrays_up": ["update"]}]
    rows = summarise(old)
    assert [(r["direction"], r["messages"], r["bytes"], r["bytes_max"]) for r in rows] == [
        ("down", 40, 4000, "n/a"), ("up", 39, 900, "n/a")]
    assert "update/*" in rows[1]["arrays"]
