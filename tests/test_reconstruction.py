"""History reconstruction from uploaded updates (fedkd.reconstruction, server.attacks): on
hand-built updates whose answer is known, and through the server's observer, per client and,
under secure aggregation, on the round's unmasked sum only."""

from types import SimpleNamespace

import numpy as np
import pytest

from fedkd.config import ExperimentConfig
from fedkd.population import population
from fedkd.reconstruction import (Tally, attack, history_items, popularity_ranking, precision_recall, rank_items,
                                  row_change)
from server.attacks import ReconstructionAttack, reconstruction_step
from server.replies import Upload
from server.transport import Node


def _table(rows: dict[int, float], num_items: int = 6, dim: int = 2) -> dict:
    """An update whose item table changes row i by ``rows[i]`` in L2 norm (0 elsewhere)."""
    t = np.zeros((num_items + 1, dim), np.float32)
    for i, norm in rows.items():
        t[i] = [norm * 0.6, norm * 0.8]  # a 3-4-5 triangle: the row's norm is exactly `norm`
    return {"item_emb.weight": t, "other.weight": np.ones(3, np.float32)}


def test_row_change_is_each_rows_l2_norm_and_the_ranking_skips_padding():
    upd = _table({0: 9.0, 2: 1.0, 5: 3.0, 4: 1.0})
    assert np.allclose(row_change(upd), [9, 0, 1, 0, 1, 3, 0])
    assert rank_items(row_change(upd)).tolist() == [5, 2, 4, 1, 3, 6]  # ties by the smaller id; 0 never ranks


def test_a_hand_built_update_gives_the_known_precision_and_recall():
    truth = np.array([2, 5])
    popular = np.array([1, 2, 3, 4, 5, 6])
    res = attack(_table({2: 1.0, 5: 2.0, 3: 0.1}), truth, popular)
    assert res == {"k": 2, "precision": 1.0, "recall": 1.0, "popularity_precision": 0.5, "popularity_recall": 0.5,
                   "random_precision": 2 / 6}
    # one wrong item changes more than a true one: half the guesses right, half the history found
    res = attack(_table({2: 1.0, 5: 2.0, 3: 1.5}), truth, popular)
    assert (res["precision"], res["recall"]) == (0.5, 0.5)
    assert precision_recall(np.array([5, 3, 2]), truth, 3) == (2 / 3, 1.0)  # at another k the two differ


def test_history_items_and_popularity_use_training_items_only():
    seqs = [np.array([1, 2, 3, 9, 8]), np.array([2, 2, 4, 7, 6]), np.array([5, 5, 5, 5, 1])]
    assert history_items(seqs, [0, 1]).tolist() == [1, 2, 3, 4]  # the last two of each history are held out
    assert popularity_ranking(seqs, [1, 2], num_items=9).tolist()[:3] == [5, 2, 4]  # counts 3, 2, 1


def test_tally_averages_per_unit_then_over_units():
    t = Tally()
    one = dict(k=2, precision=1.0, recall=1.0, popularity_precision=0.0, popularity_recall=0.0, random_precision=0.5)
    t.add(7, {**one, "precision": 0.0})
    t.add(7, one)  # client 7: 0.5 on average
    t.add(8, one)  # client 8: 1.0
    s = t.summary()
    assert (s["units"], s["attacks"], s["precision@k"], s["mean_k"]) == (2, 3, 0.75, 2.0)
    again = Tally()
    again.load_state_dict(t.state_dict())
    assert again.summary() == s
    assert Tally().summary() == {"units": 0, "attacks": 0}


CFG = ExperimentConfig(synthetic_users=30, synthetic_items=200, progress=False)  # histories cover < 1/4 of the items


def _upload(pid: int, payload) -> Upload:
    return Upload(Node(node_id=100 + pid, partition_id=pid, tier=0, examples=1), {}, payload)


def _revealing_update(items: np.ndarray, num_items: int) -> dict:
    """An update that changes exactly these items' rows (the ideal case for the attacker)."""
    t = np.zeros((num_items + 1, 4), np.float32)
    t[items] = 1.0
    return {"item_emb.weight": t}


def test_the_observer_attacks_each_decoded_update_against_its_clients_items():
    pop = population(CFG)
    n = pop.dataset.num_items
    obs = ReconstructionAttack(CFG)
    obs.observe([_upload(p, _revealing_update(obs.items([p]), n)) for p in (0, 1, 2)], r=1)
    others = np.setdiff1d(np.arange(1, n + 1), obs.items([0]))  # a round in which client 0 changed only other items
    obs.observe([_upload(0, _revealing_update(others, n))], r=2)
    res = reconstruction_step(CFG, obs)(None)["reconstruction_attack"]
    assert res["observed"] == "client-update" and (res["units"], res["attacks"]) == (3, 4)
    assert res["precision@k"] == pytest.approx((0.5 + 1 + 1) / 3) == res["recall@k"]  # client 0: (1 + 0) / 2
    assert 0 < res["random_precision@k"] < 1 and 0 <= res["popularity_precision@k"] <= 1
    restored = ReconstructionAttack(CFG)  # the tally is checkpointed with the round loop's parts
    restored.load_state_dict(obs.state_dict())
    assert restored.result() == obs.result()


def test_under_secure_aggregation_only_the_rounds_sum_is_attacked_against_the_union():
    """The observer reads the sum the secure aggregator unmasked (``last_sum``), never an upload:
    a refused round (``last_sum`` None) teaches it nothing."""
    pop = population(CFG)
    n = pop.dataset.num_items
    secure = SimpleNamespace(last_sum=None, last_groups=[], group_size=0)  # what SecureSum shows the attack
    obs = ReconstructionAttack(CFG.replace(secure_aggregation=True), secure=secure)
    masked = {p: {"masked": np.zeros(3, np.uint32)} for p in (0, 3)}  # uploads are opaque to the attack
    secure.last_sum = {k: _revealing_update(obs.items([0]), n)[k] + _revealing_update(obs.items([3]), n)[k]
                       for k in ("item_emb.weight",)}
    obs.observe([_upload(p, v) for p, v in masked.items()], r=5)
    secure.last_sum = None  # round 6 refused below the threshold
    obs.observe([_upload(0, masked[0])], r=6)
    res = obs.result()["reconstruction_attack"]
    union = obs.items([0, 3])
    assert res["observed"] == "round-sum" and (res["units"], res["attacks"]) == (1, 1)
    assert res["precision@k"] == 1.0 and res["mean_k"] == len(union)


def test_with_groups_each_groups_sum_is_attacked_against_its_members_union():
    """Secure aggregation in groups: the server learns each group's sum (``last_groups``), so
    each is attacked against its own members' items, as one unit of its own."""
    pop = population(CFG)
    n = pop.dataset.num_items
    sums = {p: _revealing_update(ReconstructionAttack(CFG).items([p]), n) for p in (0, 3, 5)}
    secure = SimpleNamespace(last_sum={"item_emb.weight": sum(s["item_emb.weight"] for s in sums.values())},
                             last_groups=[([0, 3], {"item_emb.weight": sums[0]["item_emb.weight"]
                                                    + sums[3]["item_emb.weight"]}),
                                          ([5], {"item_emb.weight": sums[5]["item_emb.weight"]})],
                             group_size=2)
    obs = ReconstructionAttack(CFG.replace(secure_aggregation=True), secure=secure)
    obs.observe([_upload(p, {"masked": np.zeros(3, np.uint32)}) for p in (0, 3, 5)], r=2)
    res = obs.result()["reconstruction_attack"]
    assert res["observed"] == "group-sum" and (res["units"], res["attacks"]) == (2, 2)
    assert res["precision@k"] == 1.0 and res["mean_k"] == (len(obs.items([0, 3])) + len(obs.items([5]))) / 2


def test_other_protocols_say_why_there_is_nothing_to_attack():
    got = reconstruction_step(CFG.replace(protocol="logits"), None)(None)
    assert "protocol logits uploads no item-table update" in got["reconstruction_attack"]["skipped"]
