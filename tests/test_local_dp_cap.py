"""dp-local-participations in the server's whole round loop with the real ClientApp, in this
process (the grid of tests/test_large_fleets.py, answering as Flower's simulation engine does:
a ClientApp that raises becomes an error reply). An honest server stops picking a device that
has sent its cap of noisy updates; a server that keeps picking it is refused by the device."""

from __future__ import annotations

import json

from flwr.app import Error, Message

import server.privacy
from fedkd.config import ExperimentConfig
from fedkd.population import population
from server.experiment import Experiment
from test_large_fleets import _Grid, _flower_identity  # noqa: F401 (the fixture stamps messages)

TINY = {"synthetic-users": 40, "synthetic-items": 60, "synthetic-mean-length": 8, "num-rounds": 3,
        "teacher-epochs": 1, "progress": False, "membership-attack": False, "reconstruction-attack": False,
        "dp-mode": "local", "dp-noise-multiplier": 0.5, "dp-clip-norm": 0.5, "dp-local-participations": 1}


class _EngineGrid(_Grid):
    """Replies as the simulation engine does when the ClientApp raises: an error message with its reason."""

    def pull_messages(self, ids):
        from clients.client_app import app
        out = []
        for i in ids:
            m = self.stored.pop(i, None)
            if m is None:
                continue
            try:
                out.append(app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as ex:  # noqa: BLE001 - what vce_api.worker does
                out.append(Message(Error(code=0, reason=f"{type(ex)}:<'{ex}'>"), reply_to=m))
        return out


def _run(tmp_path, name):
    flat = {**TINY, "output-dir": str(tmp_path), "experiment-name": name, "cache-dir": str(tmp_path / "cache")}
    n = population(ExperimentConfig.from_flat(flat)).num_clients
    flat["clients-per-round"] = n // 2
    out = tmp_path / name
    out.mkdir()
    summary = Experiment(ExperimentConfig.from_flat(flat), out).run(_EngineGrid(n, run_config=flat))
    return n, summary, json.loads((out / "privacy.json").read_text()), out


def test_an_honest_server_picks_each_device_until_its_cap_then_stops(tmp_path, caplog):
    with caplog.at_level("INFO", logger="fedkd"):
        n, summary, privacy, _ = _run(tmp_path, "honest")
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("differential privacy"))
    assert "sends at most 1 noisy updates" in first and "after 3 rounds" not in first  # priced for K, not all rounds
    assert privacy["cap"] == 1 and set(privacy["participations"].values()) == {1}
    assert len(privacy["participations"]) == 2 * (n // 2)  # round 2 picked the other half
    stopped = summary["privacy"]["stopped"]
    assert stopped["round_refused"] == 3 and stopped["reason"].startswith(  # everyone has sent theirs
        "every device has sent the 1 noisy updates dp-local-participations allows")


def test_a_device_refuses_a_server_that_ignores_its_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(server.privacy.PrivacyBudget, "may_train", lambda self, pid: True)
    n, summary, privacy, out = _run(tmp_path, "greedy")
    assert set(privacy["participations"].values()) == {1}  # nothing past the cap was accepted
    rejected = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    refused = {r["partition_id"] for r in rejected if "all that dp-local-participations = 1 allows" in r["detail"]}
    assert refused and refused <= {int(p) for p in privacy["participations"]}  # each had sent its one
