"""Real Flower simulations (ServerApp + ClientApps on the Ray engine) of the privacy features:
the wire audit that proves no private history crosses, DP with a budget stop, local DP."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e2e_runs import BASE, ROOT, run_case
from fedkd.privacy import epsilon_for

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, cache: Path, name: str, flat: dict) -> Path:
    """A run of its own: 50 synthetic users, 80 items, 2 rounds, plus ``flat``."""
    return run_case(name, tmp_path / "out", cache, flat={**BASE, **flat}).out


def _audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", "audit", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


# What may cross, by direction and message type: record -> array keys. Anything else fails.
ALLOWED_ARRAYS = {("down", "query"): {}, ("up", "query"): {},
                  ("down", "train"): {"student": {"codes", "scale", "offset"}, "proxy": {"histories", "sl.ids", "sl.probs.data", "sl.probs.scale", "sl.probs.offset"}},
                  ("up", "train"): {"update": {"codes", "scale", "offset"}},
                  ("down", "evaluate"): {"student": {"codes", "scale", "offset"}}, ("up", "evaluate"): {}}


RATE = 10 / 40  # clients-per-round 10 of the 40 edge clients: Poisson sampling at this rate
# Central DP whose budget lets 2 of the 4 configured rounds train: the target lies between the
# epsilon after 2 rounds and after 3.
BUDGET = {"num-rounds": 4, "clients-per-round": 10, "dp-mode": "central", "dp-noise-multiplier": 1.0,
          "dp-clip-norm": 0.5,
          "dp-target-epsilon": (epsilon_for(1.0, RATE, 2, 1e-5) + epsilon_for(1.0, RATE, 3, 1e-5)) / 2}


@pytest.fixture(scope="module")
def budget_run(golden, tmp_path_factory) -> Path:
    """BUDGET with every message's payload kept (``wire-payloads``): one run for two claims
    that do not touch each other. test_central_dp_stops_at_the_budget_with_a_clear_message:
    the accountant stops the run; test_no_private_history_crosses_the_wire: nothing in any
    message of a run (here a central-DP run, whose devices send what any params run sends)
    is an edge user's history."""
    tmp = tmp_path_factory.mktemp("budget")
    return _run(tmp, golden.teacher_copy(tmp / "cache"), "dp", {**BUDGET, "wire-payloads": True})


def test_no_private_history_crosses_the_wire(budget_run):
    out = budget_run
    lines = [json.loads(x) for x in (out / "wire.jsonl").open()]
    # every message in both directions: each message sent has its reply, none failed
    assert [ln["seq"] for ln in lines] == list(range(1, len(lines) + 1))
    for kind in ("query", "train", "evaluate"):
        down = [ln for ln in lines if ln["type"] == kind and ln["direction"] == "down"]
        up = [ln for ln in lines if ln["type"] == kind and ln["direction"] == "up"]
        assert len(down) == len(up) > 0 and not any("error" in ln for ln in up)
    assert all(ln["bytes"] > 0 for ln in lines)
    # the log: only the allowed records and keys, and metrics without anything history-like
    for ln in lines:
        allowed = ALLOWED_ARRAYS[(ln["direction"], ln["type"])]
        assert set(ln["arrays"]) <= set(allowed), ln
        for rec, keys in ln["arrays"].items():
            assert set(keys) <= allowed[rec], ln
            assert all(dtype in ("uint8", "float32") for dtype, _ in keys.values()), ln
    up_metrics = {k for ln in lines if ln["direction"] == "up" for keys in ln["metrics"].values() for k in keys}
    assert up_metrics <= {"partition-id", "tier", "num-examples", "steps", "step-limit", "loss", "train-seconds",
                          "valid-hr-sum", "valid-ndcg-sum", "valid-count", "test-hr-sum", "test-ndcg-sum",
                          "test-count"}
    # the payloads themselves: every value of every message, searched for the edge users' histories
    from simulations.audit_cmd import history_findings

    findings, searched = history_findings(out)
    assert searched == len(lines) and findings == []

    # ... and the checker can fail: an upload that smuggles one edge user's history is caught
    from fedkd.audit import find_history
    from fedkd.codec import pack_ids
    from fedkd.config import ExperimentConfig
    from fedkd.population import population

    cfg = ExperimentConfig.from_flat(json.loads((out / "config.json").read_text())["config"])
    pop = population(cfg)
    user = int(pop.clients[5][0])
    history = pop.dataset.sequences[user]
    upload = next(ln for ln in lines if ln["direction"] == "up" and ln["type"] == "train")
    with np.load(out / "wire" / f"{upload['seq']:07d}.npz") as z:
        arrays = {k: z[k].copy() for k in z.files}
    packed = pack_ids(history[:20], pop.dataset.num_items)
    arrays["array:update/codes"][100:100 + packed.size] = packed  # hidden inside the quantised codes
    private = {int(u): pop.dataset.sequences[u] for c in pop.clients for u in c}
    public = [pop.dataset.sequences[u][:-2] for u in pop.cloud_users]
    hits = find_history(arrays, private, num_items=pop.dataset.num_items, public=public)
    assert hits and {h["user"] for h in hits} == {user}

    # the command: on the run, with the payload check, and on a folder of runs
    proc = _audit(str(out), "--history")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| up | train |" in proc.stdout and "no private history found" in proc.stdout
    assert _audit(str(out.parent), "--json").returncode == 0


def test_central_dp_stops_at_the_budget_with_a_clear_message(budget_run):
    rate, target = RATE, BUDGET["dp-target-epsilon"]  # 2 rounds fit, 3 do not
    out = budget_run
    summary = json.loads((out / "summary.json").read_text())
    stop = summary["privacy"]["stopped"]
    assert stop["round_refused"] == 3 and stop["rounds_trained"] == 2 and "over the target" in stop["reason"]
    assert summary["dp_epsilon"] == pytest.approx(epsilon_for(1.0, rate, 2, 1e-5)) and summary["dp_epsilon"] <= target
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[0]["dp_epsilon"]) < float(rows[1]["dp_epsilon"])
    assert all(0 <= int(r["dp_clipped"]) <= int(r["aggregated"]) for r in rows)
    acc = json.loads((out / "privacy.json").read_text())  # the accountant's state, written each round
    assert acc["rounds"] == 2 and acc["mode"] == "central" and acc["noise_multiplier"] == 1.0
    assert "privacy budget: round 3 would raise epsilon" in (out / "run.log").read_text()
    assert 0.0 <= summary["mia_auc"] <= 1.0 and summary["membership_attack"]["members"] == 40
    assert summary["best_round"] in (1, 2)


def test_local_dp_noises_every_update_on_the_device(naive_labels_local_dp):
    """dp-mode local, z = 0.5, C = 0.5, 2 rounds (the shared run also sends float32 soft labels,
    for test_e2e_communication: they go down, the noised updates up)."""
    out = naive_labels_local_dp.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "local" and summary["privacy"]["releases"] == 2  # every client, 2 rounds
    assert summary["dp_epsilon"] == pytest.approx(epsilon_for(0.5, 1.0, 2, 1e-5))
    assert summary["rejected_total"] == 0 and summary["privacy"]["stopped"] is None


def test_secure_aggregation_with_distributed_dp_in_real_rounds(tmp_path, teacher_cache):
    """SecAgg+ with dropout recovery in fedkd's own rounds (each device masks with and shares among
    7 of the 10: its neighbourhood), with distributed DP (each device clips,
    rounds and adds its discrete Gaussian share under the masks) and adaptive clipping (the
    unclipped count as one more noised coordinate of the secure sum), and 30% of the devices
    crashing after they shared their seeds: every round the survivors' noisy sum is recovered and
    moves the model, the accountant prices it, the clip follows the count, and every step's
    messages are real Flower messages whose bytes are counted."""
    from fedkd import ddp

    out = _run(tmp_path, teacher_cache, "sa", {"secure-aggregation": True, "dp-mode": "distributed",
                                               "dp-clip-norm": 0.5, "dp-noise-multiplier": 0.3,
                                               "dp-clip-adaptive": True, "clients-per-round": 10,
                                               "wire-payloads": True, "fault-crash": 0.3, "secagg-shares": 7})
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["rounds"] == 2 and privacy["mode"] == "distributed"
    assert summary["dp_epsilon"] == pytest.approx(ddp.epsilon(0.3, RATE, 2, 1e-5, tau=privacy["tau"],
                                                              dim=privacy["dim"]))
    assert summary["dp_epsilon"] > epsilon_for(0.3, RATE, 2, 1e-5)  # the general subsampling bound's price
    mech = privacy["distributed"]
    assert mech["update_noise_multiplier"] == pytest.approx((0.3 ** -2 - 1.0 ** -2) ** -0.5)  # sigma_b = 10 / 20
    assert mech["count_scale"] == int(mech["noise_std_steps"] // (2 * 0.5))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    lines = [json.loads(x) for x in (out / "wire.jsonl").open()]
    digests = [r["model_digest"] for r in rows]
    assert len(set(digests)) == 2  # the model moved in both rounds
    clip = 0.5  # the clip follows the noisy count of unclipped updates
    for row in rows:
        assert float(row["dp_clip_norm"]) == pytest.approx(clip)
        clip *= math.exp(-0.2 * (float(row["dp_unclipped_share"]) - 0.5))
    assert privacy["adaptive_clip"]["final_clip"] == pytest.approx(clip)
    assert sum(privacy["participations"].values()) == sum(int(r["aggregated"]) for r in rows)
    for r, row in zip((1, 2), rows):
        of = lambda kind, d: [ln for ln in lines if ln["round"] == r and ln["type"] == kind  # noqa: E731
                              and ln["direction"] == d]
        shares_up, uploads, unmask_up = of("query.secagg_keys", "up"), of("train", "up"), of("query.secagg_unmask", "up")
        survivors = [ln for ln in uploads if "error" not in ln]
        assert len(shares_up) == len(uploads) > len(survivors) == len(unmask_up) == int(row["aggregated"]) > 1
        assert int(row["skipped"]) == 0 and int(row["rejected_crashed"]) == len(uploads) - len(survivors)
        assert all(ln["configs"] == {"secagg": {"shares": "bytes"}} for ln in shares_up + unmask_up)
        assert all(set(ln["arrays"]) == {"masked"} and ln["arrays"]["masked"]["values"][0] == "uint8"
                   for ln in survivors)
        assert all(ln["configs"]["peers"] == {"ids": "list", "keys": "bytes"} for ln in of("train", "down"))
        assert all({"dp-clip", "dp-clients"} <= set(ln["configs"]["config"]) for ln in of("train", "down"))
        # every message of the round is in its bytes columns, keys and shares included
        counted = [ln for ln in lines if ln["round"] == r and ln["type"] in
                   ("train", "query.secagg_keys", "query.secagg_unmask")]
        assert int(row["bytes_up"]) == sum(ln["bytes"] for ln in counted if ln["direction"] == "up")
        assert int(row["bytes_up_keys"]) > 0 and int(row["bytes_down_keys"]) > 0
        # one masked vector alone: bytes spread evenly, whatever the update
        with np.load(out / "wire" / f"{survivors[0]['seq']:07d}.npz") as z:
            v = z["array:masked/values"]
        assert np.abs(np.bincount(v >> 4, minlength=16) / v.size - 1 / 16).max() < 0.03
    from simulations.audit_cmd import history_findings

    assert history_findings(out)[0] == []


def test_the_reconstruction_attack_is_in_the_golden_runs_summaries(golden):
    """summary.json's reconstruction_attack, from the shared golden runs: per client where the
    server decodes each update (well above popularity and chance: an update's item rows give the
    history away), on the round's sum under secure aggregation, and a reason where nothing is
    uploaded to attack (the logit protocol uploads predictions)."""
    got = {name: json.loads((golden[name].out / "summary.json").read_text())["reconstruction_attack"]
           for name in ("default", "secagg", "logits-refine")}
    plain = got["default"]
    assert plain["observed"] == "client-update" and (plain["units"], plain["attacks"]) == (40, 80)
    assert plain["precision@k"] > plain["popularity_precision@k"] + 0.3
    assert plain["precision@k"] > plain["random_precision@k"] + 0.3
    secure = got["secagg"]
    assert secure["observed"] == "round-sum" and secure["units"] == 2 and 0 <= secure["precision@k"] <= 1
    assert "uploads no item-table update" in got["logits-refine"]["skipped"]


@pytest.mark.slow
@pytest.mark.extended  # a run of its own (15-25 s of a worker); CI keeps the server's exact group sums (test_secagg)
def test_secure_aggregation_in_groups_gives_the_same_student_with_smaller_masked_uploads(golden, tmp_path):
    """The golden secagg case (10 devices a round) run again in groups of at most 4 (groups of
    4, 3 and 3): each group's sum is unmasked in its own ring and the sums are added as exact
    integers, so the global student is the single secure sum's, bit for bit (round 1), while
    each masked upload shrinks to its group's ring (10 bits instead of 12), and the
    reconstruction attack sees what the server now learns, each group's sum."""
    from e2e_runs import CASES

    run = run_case("secagg-groups", tmp_path, golden.teacher_copy(tmp_path / "cache"),  # round 1 (test time)
                   flat={**BASE, **CASES["secagg"], "secagg-group-size": 4, "num-rounds": 1})
    rows = {name: list(csv.DictReader((out / "metrics.csv").open()))
            for name, out in (("one", golden["secagg"].out), ("groups", run.out))}
    assert [r["model_digest"] for r in rows["groups"]] == [rows["one"][0]["model_digest"]]
    assert [r["aggregated"] for r in rows["groups"]] == ["10"]
    sizes = {name: {ln["arrays"]["masked"]["values"][1][0] for ln in map(json.loads, (out / "wire.jsonl").open())
                    if ln["direction"] == "up" and "masked" in ln["arrays"]}
             for name, out in (("one", golden["secagg"].out), ("groups", run.out))}
    length = max(sizes["one"]) * 8 // 12  # values in a masked upload: 10 x 254 needs 12 bits, 4 x 254 10 bits
    assert sizes == {"one": {-(-length * 12 // 8)}, "groups": {-(-length * 10 // 8)}}
    attack = json.loads((run.out / "summary.json").read_text())["reconstruction_attack"]
    assert attack["observed"] == "group-sum" and attack["units"] == 3  # 3 groups in round 1
