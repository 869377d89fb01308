"""Evaluation through the clients: each scores its own held-out item and returns metric sums only.

Model selection is on validation; the test split is scored once, for the model validation
chose. Where the models live on the devices (no global state), the test split is scored in
the same message as validation and kept, to be reported only for the round validation picks.

Validation can cost as much as a round (every client answers), so ``val-clients`` validates a
fixed sample, drawn once from the seed: the same users every round keep the curve comparable
from round to round. With one held-out item per user the curve is noisy (about +-0.007 NDCG@10
between rounds on ~750 users), so ``val-smoothing`` chooses on the mean of the last few
validations, keeping the newest model of the best window, and the plateau stop
(``stop-patience``) counts validations that did not beat that smoothed best.
"""

from __future__ import annotations

from fedkd import streams
from fedkd.config import ExperimentConfig
from fedkd.results import CsvLog
from fedkd.streams import Stream
from server.fleet import Fleet
from server.protocols.base import contents_by_width
from server.transport import Node, Transport
from wire import Content, unpack


class Evaluator:
    def __init__(self, cfg: ExperimentConfig, fleet: Fleet, transport: Transport, out, *, initial_state) -> None:
        self.cfg, self.fleet, self.transport, self.out = cfg, fleet, transport, out
        self.tests: dict[int, dict] = {}  # stateful protocols: test scores of every validated round
        self.best: tuple = (-1.0, 0, initial_state)  # (val NDCG, round, state) of the model chosen so far
        self.history: list[float] = []  # every validation NDCG so far (the smoothing window reads its tail)
        self.since_best = 0  # validations in a row that did not beat the chosen one
        self.target: dict | None = None  # the first round whose validation reached target-ndcg
        self.val_nodes = _sample(fleet.nodes, cfg.val_clients, cfg.seed)

    def validate(self, grid, state, r: int) -> dict:
        """Validation of ``state`` (or of the devices' own models); keeps the chosen round."""
        if state is not None:
            ev = self.evaluate(grid, state, ("valid",), r, nodes=self.val_nodes)["valid"]
        else:
            both = self.evaluate(grid, None, ("valid", "test"), r, nodes=self.val_nodes)
            self.tests[r], ev = both["test"], both["valid"]
        self.history.append(ev["ndcg"])
        window = self.history[-self.cfg.val_smoothing:]
        score = sum(window) / len(window)
        if score > self.best[0]:
            self.best, self.since_best = (score, r, state), 0
        else:
            self.since_best += 1
        if self.target is None and self.cfg.target_ndcg and ev["ndcg"] >= self.cfg.target_ndcg:
            self.target = {"round": r}
        return {**ev, "smoothed": score}

    @property
    def plateaued(self) -> bool:
        """The plateau stop: stop-patience validations in a row without a better chosen model."""
        return self.cfg.stop_patience > 0 and self.since_best >= self.cfg.stop_patience

    def test(self, grid, per_client: str) -> dict:
        """Test split of the chosen model; per-client sums go to ``per_client`` (a CSV)."""
        _, r, state = self.best
        res = self.tests[r] if state is None else self.evaluate(grid, state, ("test",), r)["test"]
        CsvLog(self.out / per_client).extend(res["rows"])
        return res

    def saved_test(self, state) -> dict:
        """Test HR/NDCG of ``state`` exactly as saved: float32, full width (``student.pt``, what
        ``fedkd export`` ships), on the test item of every user of the fleet's devices.

        Why the server scores it: the devices score the model they are sent, which is quantised
        to ``down-bits`` (8 by default), so the devices' test score is not the saved model's.
        A device decodes the student at the run's fixed bit width, so the float32 model cannot
        be sent to it for scoring; the server builds the same per-user test items
        (``fedkd.samples.eval_set``, as each device does from its partition) from its own copy of
        the data, as the membership attack does. In a deployment whose devices hold other data
        than the server's data-path, this is the score on the server's copy.
        """
        import numpy as np

        from fedkd.local import set_state
        from fedkd.metrics import evaluate_ranking
        from fedkd.models import build_model
        from fedkd.population import population
        from fedkd.samples import eval_set

        pop = population(self.cfg)
        users = np.concatenate([pop.clients[n.partition_id] for n in sorted(self.fleet.nodes,
                                                                            key=lambda n: n.partition_id)])
        model = build_model(self.fleet.full_model, seed=None)
        set_state(model, state)
        res = evaluate_ranking(model, eval_set(pop.dataset.sequences, users, "test", self.cfg.max_len),
                               k=self.cfg.eval_k)
        n = int(res.n)
        return {"hr": float(res.per_user_hr.sum()) / max(n, 1), "ndcg": float(res.per_user_ndcg.sum()) / max(n, 1),
                "n": n}

    def evaluate(self, grid, state, splits: tuple[str, ...], r: int, *, full_width: bool = False,
                 nodes: list[Node] | None = None) -> dict:
        """Every client scores the model it would run: its own width's slice of ``state`` (the
        full student when ``full_width``, or for a device too small for any width); with
        ``state`` None, the model it keeps."""
        cfg, fleet, full = self.cfg, self.fleet, self.cfg.student_dim
        content = Content(configs={"config": {"splits": ",".join(splits), "round": r}})
        kw = {"full_model": fleet.full_model, "cfg": cfg}
        by_width = {None: content} if state is None else contents_by_width(content, state, fleet.widths, **kw)
        if state is not None and full not in by_width:
            by_width.update(contents_by_width(content, state, [full], **kw))

        def width(n: Node):
            return None if state is None else full if full_width else (fleet.width_of[n.partition_id] or full)
        nodes = fleet.nodes if nodes is None else nodes
        ex = self.transport.exchange(grid, [(n, by_width[width(n)]) for n in nodes], "evaluate", r)
        out = {}
        for split in splits:
            hr = ndcg = n = 0.0
            rows = []
            for node, rep in ex.replies:
                m = unpack(rep.content).metrics["metrics"]
                h, g, c = m[f"{split}-hr-sum"], m[f"{split}-ndcg-sum"], m[f"{split}-count"]
                hr, ndcg, n = hr + h, ndcg + g, n + c
                rows.append({"partition_id": node.partition_id, "tier": fleet.tier_of[node.partition_id],
                             "width": width(node) or full, "count": int(c), "hr_sum": h, "ndcg_sum": g})
            out[split] = {"hr": hr / max(n, 1), "ndcg": ndcg / max(n, 1), "n": int(n), "rows": rows,
                          "bytes": ex.down + ex.up}
        return out

    def tier_summary(self, grid, test: dict, rows: list[dict]) -> dict:
        """Per tier: test NDCG of the model each device runs, participation, stragglers; the
        simulated time; and, with mixed widths, the full global student on every user."""
        cfg, fleet, k = self.cfg, self.fleet, self.cfg.eval_k
        out: dict = {"sim_time_s": fleet.sim_time, "tiers": {}}
        for t, (name, _, _) in enumerate(cfg.tiers):
            rs = [r for r in test["rows"] if r["tier"] == t]
            n = sum(r["count"] for r in rs)
            out["tiers"][name] = {
                "devices": sum(1 for tt in fleet.tier_of.values() if tt == t),
                "widths": sorted({fleet.width_of[p] or 0 for p, tt in fleet.tier_of.items() if tt == t}),
                f"test_ndcg@{k}": sum(r["ndcg_sum"] for r in rs) / max(n, 1),
                f"test_hr@{k}": sum(r["hr_sum"] for r in rs) / max(n, 1), "test_users": n,
                **{key: int(sum(row.get(f"{key}_{name}", 0) for row in rows))
                   for key in ("participants", "aggregated", "stragglers")}}
        _, best_round, state = self.best
        if state is not None and any(fleet.width_of[n.partition_id] != cfg.student_dim for n in fleet.nodes):
            full = self.evaluate(grid, state, ("test",), best_round, full_width=True)["test"]
            CsvLog(self.out / "test_per_client_full_width.csv").extend(full["rows"])
            out[f"test_ndcg@{k}_full_width"] = full["ndcg"]
            out[f"test_hr@{k}_full_width"] = full["hr"]
            for t, (name, _, _) in enumerate(cfg.tiers):
                rs = [r for r in full["rows"] if r["tier"] == t]
                out["tiers"][name][f"test_ndcg@{k}_full_width"] = (sum(r["ndcg_sum"] for r in rs)
                                                                   / max(sum(r["count"] for r in rs), 1))
        return out

    def state_dict(self) -> dict:
        return {"tests": self.tests, "best": self.best, "history": self.history, "since_best": self.since_best,
                "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        self.tests, self.best, self.history = state["tests"], state["best"], state["history"]
        self.since_best, self.target = state["since_best"], state["target"]


def _sample(nodes: list[Node], k: int, seed: int) -> list[Node]:
    """``k`` of the nodes, the same for every round of a seed (all of them when k is 0 or too big)."""
    if k == 0 or k >= len(nodes):
        return list(nodes)
    pick = set(streams.rng(seed, Stream.VAL_SAMPLE).choice(sorted(n.partition_id for n in nodes), size=k,
                                                           replace=False).tolist())
    return [n for n in nodes if n.partition_id in pick]
