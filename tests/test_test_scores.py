"""One test score that means one thing: the devices score the student as they receive it
(quantised to down-bits), the server scores the saved float32 student.pt on the same items."""

from types import SimpleNamespace

import numpy as np
import pytest

from fedkd.codec import decode_state, encode_state, layout_of
from fedkd.config import ExperimentConfig
from fedkd.edge import client_data
from fedkd.local import get_state, set_state
from fedkd.metrics import evaluate_ranking
from fedkd.models import build_model
from fedkd.population import population
from server.evaluation import Evaluator
from simulations.end_of_run import summary_lines


def _device_scores(cfg, pop, state, bits: int) -> tuple[float, float]:
    """What the devices report: each decodes the student at ``bits`` and scores its own test items."""
    hr = ndcg = n = 0.0
    layout = layout_of(state)
    for pid in range(pop.num_clients):
        data = client_data(cfg, pid)
        model = build_model(cfg.student_model(pop.dataset.num_items), seed=None)
        set_state(model, decode_state(encode_state(state, bits=bits, stochastic=False), layout, bits=bits))
        res = evaluate_ranking(model, data.test, k=cfg.eval_k)
        hr, ndcg, n = hr + res.per_user_hr.sum(), ndcg + res.per_user_ndcg.sum(), n + res.n
    return hr / n, ndcg / n


def test_the_server_scores_the_saved_float32_student_on_the_devices_test_items(tmp_path):
    cfg = ExperimentConfig(synthetic_users=50, synthetic_items=80)
    pop = population(cfg)
    full = cfg.student_model(pop.dataset.num_items)
    state = get_state(build_model(full, seed=3))
    fleet = SimpleNamespace(nodes=[SimpleNamespace(partition_id=p) for p in reversed(range(pop.num_clients))],
                            full_model=full)
    saved = Evaluator(cfg, fleet, None, tmp_path, initial_state=state).saved_test(state)
    assert saved["n"] == sum(len(c) for c in pop.clients) == 40
    # the devices, were they sent the float32 student, would report exactly this
    assert (saved["hr"], saved["ndcg"]) == pytest.approx(_device_scores(cfg, pop, state, 32), abs=1e-12)
    # a quantised student (2-bit here, so that the difference cannot vanish) is another model
    assert saved["ndcg"] != pytest.approx(_device_scores(cfg, pop, state, 2)[1], abs=1e-9)


def test_the_end_of_run_says_which_model_each_score_is(tmp_path):
    import json

    summary = {"experiment": "x", "protocol": "params", "clients": 40, "clients_trained": 40, "rounds": 2,
               "best_round": 2, "best_val_ndcg": 0.05, "test_hr@10": 0.175, "test_ndcg@10": 0.1049, "test_users": 40,
               "test_model": "the global student of round 2 as the devices received it (8-bit), scored on the devices",
               "test_model_float32": "the same student as saved in student.pt (float32, ...)",
               "test_hr@10_float32": 0.2, "test_ndcg@10_float32": 0.1052}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = summary_lines(tmp_path)
    assert lines[1].startswith("test HR@10 0.1750, NDCG@10 0.1049 on 40 users: the model of round 2")
    assert lines[2] == "that is the global student of round 2 as the devices received it (8-bit), scored on the devices"
    assert lines[3] == "student.pt as saved (float32, what `fedkd export` ships): HR@10 0.2000, NDCG@10 0.1052"
    assert np.isfinite(summary["test_ndcg@10_float32"])
