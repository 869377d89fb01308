"""simulations.secagg_bytes: bytes per client-round from wire logs, over the rounds both runs ran."""

import json

from simulations.secagg_bytes import row


def _run(path, secure, lines):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"config": {"secure-aggregation": secure, "quant-bits": 8,
                                                             "clients-per-round": 2}}))
    (path / "wire.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return path


def _msg(r, pid, kind, direction, nbytes):
    return {"round": r, "partition_id": pid, "type": kind, "direction": direction, "bytes": nbytes}


def test_a_short_secure_run_is_set_against_the_same_rounds_of_a_long_plain_one(tmp_path):
    # the plain run's train messages shrink after round 1 (the distillation batch stops)
    plain = _run(tmp_path / "plain", False, [_msg(r, p, "train", d, n) for r in (1, 2, 3) for p in (1, 2)
                                             for d, n in (("down", 1000 if r == 1 else 400), ("up", 100))])
    secure = _run(tmp_path / "secure", True, [
        *[_msg(1, p, "train", "down", 1100) for p in (1, 2)], *[_msg(1, p, "train", "up", 200) for p in (1, 2)],
        *[_msg(1, p, "query.secagg_keys", d, 30) for p in (1, 2) for d in ("down", "up")],
        *[_msg(1, p, "query.secagg_unmask", d, 20) for p in (1, 2) for d in ("down", "up")],
        _msg(1, 3, "train", "down", 1100)])  # a device that dropped: not a completed client-round
    got = row(plain, secure)
    assert got["client_rounds"] == 2 and got["plain_up"] == 100 and got["secure_up"] == 250
    assert got["ratio_up"] == 2.5
    assert got["down_extra"] == 1100 + 30 + 20 - 1000  # against round 1's 1,000, not the 3-round mean of 600
