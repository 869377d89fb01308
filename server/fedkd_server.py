"""The fedkd round loop: teacher soft labels down, quantised updates up, evaluation through clients.

Written against Flower's Grid (custom ``train``/``evaluate``/``query`` messages) rather than
a built-in strategy, because a round carries more than one ArrayRecord (student plus proxy
batch with soft labels) and the replies are quantised payloads that must be validated and
decoded before any averaging; Flower's FedAvg expects exactly one float ArrayRecord.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedkd.aggregate import apply_update, weighted_mean
from fedkd.codec import PayloadError, decode_state, encode_state, layout_of
from fedkd.config import ExperimentConfig
from fedkd.local import get_state
from fedkd.models import build_model, num_parameters
from fedkd.plots import plot_run
from fedkd.population import population
from fedkd.proxy import build_proxy_set, encode_proxy, round_batch, soft_labels
from fedkd.results import CsvLog, JsonLines, read_metrics, write_json
from fedkd.samples import eval_set, train_samples
from fedkd.teacher import load_or_train
from fedkd.wire import Content, message_nbytes, pack, unpack

log = logging.getLogger("fedkd")


@dataclass(frozen=True)
class Node:
    node_id: int
    partition_id: int
    tier: int
    examples: int


class FedKDServer:
    """Runs one experiment on a Grid and writes its results folder."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path) -> None:
        if cfg.kd_weight > 0 and cfg.cloud_fraction == 0:
            raise ValueError("kd-weight > 0 needs a teacher, and cloud-fraction = 0 leaves it no "
                             "data: set cloud-fraction > 0 or kd-weight = 0")
        self.cfg, self.out = cfg, out_dir
        self.metrics = CsvLog(out_dir / "metrics.csv")
        self.rejections = JsonLines(out_dir / "rejections.jsonl")
        self.wire_log = JsonLines(out_dir / "wire.jsonl")
        (out_dir / "rejections.jsonl").touch()  # present (and empty) when nothing was rejected

    # ------------------------------------------------------------------ setup
    def _teacher_and_proxy(self):
        cfg = self.cfg
        pop = population(cfg)  # the server reads cloud users only
        if cfg.kd_weight == 0:
            return None, None, {}
        seqs, cloud = pop.dataset.sequences, pop.cloud_users
        train = train_samples([seqs[u][:-2] for u in cloud], cfg.max_len)
        valid = eval_set(seqs, cloud, "valid", cfg.max_len)
        teacher, info = load_or_train(
            cfg.teacher_model(pop.dataset.num_items), cfg.teacher_train(), pop.dataset.fingerprint(),
            train, valid, cache_dir=Path(cfg.cache_dir),
            extra={"cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed},
            progress=lambda row: log.info("teacher epoch %s: loss %.4f, cloud valid NDCG@10 %.4f",
                                          row["epoch"], row["loss"], row["valid_ndcg"]))
        proxy = build_proxy_set(seqs, cloud, size=cfg.proxy_size, max_len=cfg.max_len, seed=cfg.seed)
        return teacher, proxy, info

    def _handshake(self, grid: Grid) -> list[Node]:
        node_ids = list(grid.get_node_ids())
        msgs = [Message(pack(Content()), dst_node_id=n, message_type="query") for n in node_ids]
        nodes = []
        for rep in grid.send_and_receive(msgs):
            if rep.has_error():
                log.warning("node %s failed the handshake: %s", rep.metadata.src_node_id, rep.error.reason)
                continue
            m = unpack(rep.content).metrics["metrics"]
            nodes.append(Node(rep.metadata.src_node_id, int(m["partition-id"]), int(m["tier"]),
                              int(m["num-examples"])))
        return sorted(nodes, key=lambda n: n.partition_id)

    # ------------------------------------------------------------------ rounds
    def run(self, grid: Grid) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        teacher, proxy, teacher_info = self._teacher_and_proxy()
        num_items = population(cfg).dataset.num_items
        student = build_model(cfg.student_model(num_items), seed=cfg.seed)
        state = get_state(student)
        layout = layout_of(state)
        nodes = self._handshake(grid)
        if not nodes:
            raise RuntimeError("no client answered the handshake; nothing to train")
        log.info("%d clients, student %d parameters, %d rounds", len(nodes), num_parameters(student),
                 cfg.num_rounds)
        t_rounds, cum_bytes = time.perf_counter(), 0
        best = (-1.0, 0, state)
        bar = _progress(cfg)
        extra_tests: dict[int, dict] = {}
        for r in range(1, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            selected = self._select(nodes, r)
            content = Content(arrays={"student": encode_state(state, bits=cfg.quant_bits, stochastic=False)},
                              configs={"config": {"round": r}})
            if teacher is not None:
                batch = round_batch(proxy, round_idx=r, size=cfg.proxy_batch, seed=cfg.seed)
                sl = soft_labels(teacher, batch, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
                content.arrays["proxy"] = encode_proxy(batch, sl, num_items=num_items, bits=cfg.soft_label_bits)
                content.configs["config"]["proxy-rows"] = len(batch)
            replies, down, up = self._exchange(grid, selected, content, "train", r)
            updates, weights, steps, losses, rejected = [], [], {}, [], 0
            for node, rep in replies:
                try:
                    got = unpack(rep.content)
                    upd = decode_state(got.arrays.get("update", {}), layout, bits=cfg.quant_bits)
                    m = got.metrics["metrics"]
                    if not int(m["steps"]) <= int(m["step-limit"]):
                        raise PayloadError(f"reports {m['steps']} steps over its limit {m['step-limit']}")
                except (PayloadError, ValueError, KeyError) as exc:
                    rejected += 1
                    self.rejections.append({"round": r, "partition_id": node.partition_id,
                                            "node_id": node.node_id, "reason": str(exc)})
                    log.warning("round %d: rejected update of client %d: %s", r, node.partition_id, exc)
                    continue
                updates.append(upd)
                weights.append(float(m["num-examples"]))
                steps.setdefault(int(m["tier"]), []).append(int(m["steps"]))
                losses.append(float(m["loss"]))
            if updates:
                state = apply_update(state, weighted_mean(updates, weights), cfg.server_lr)
            cum_bytes += down + up
            row = {"round": r, "participants": len(selected), "replied": len(replies),
                   "stragglers": len(selected) - len(replies), "rejected": rejected,
                   "aggregated": len(updates), "train_loss": _mean(losses),
                   "bytes_down": down, "bytes_up": up, "cum_bytes": cum_bytes}
            for t, (name, _, _) in enumerate(cfg.tiers):
                row[f"steps_mean_{name}"] = _mean(steps.get(t, []))
                row[f"steps_max_{name}"] = max(steps.get(t, [0]))
            if r % cfg.eval_every == 0 or r == cfg.num_rounds or r in cfg.extra_test_rounds:
                ev = self._evaluate(grid, nodes, state, "valid", r)
                row.update({"val_hr": ev["hr"], "val_ndcg": ev["ndcg"], "eval_bytes": ev["bytes"]})
                if ev["ndcg"] > best[0]:
                    best = (ev["ndcg"], r, state)
            else:
                row.update({"val_hr": "", "val_ndcg": "", "eval_bytes": 0})
            if r in cfg.extra_test_rounds and r != cfg.num_rounds:
                t = self._evaluate(grid, nodes, best[2], "test", r, per_client=f"test_per_client_r{r}.csv")
                extra_tests[r] = {"best_round": best[1], "hr": t["hr"], "ndcg": t["ndcg"],
                                  "train_bytes": cum_bytes}
            row.update({"round_s": time.perf_counter() - t0, "wall_s": time.perf_counter() - t_rounds})
            self.metrics.append(row)
            bar.update(1)
            log.info("round %d/%d: val NDCG@%d %s, %d/%d aggregated, %.0f kB down %.0f kB up, %.1fs",
                     r, cfg.num_rounds, cfg.eval_k, _fmt(row["val_ndcg"]), len(updates), len(selected),
                     down / 1e3, up / 1e3, row["round_s"])
        bar.close()
        test = self._evaluate(grid, nodes, best[2], "test", best[1], per_client="test_per_client.csv")
        rows = read_metrics(self.out / "metrics.csv")
        summary = {
            "experiment": cfg.experiment_name, "clients": len(nodes), "rounds": cfg.num_rounds,
            "student_parameters": num_parameters(student), "best_round": best[1],
            "best_val_ndcg": best[0], f"test_hr@{cfg.eval_k}": test["hr"],
            f"test_ndcg@{cfg.eval_k}": test["ndcg"], "test_users": test["n"],
            "train_bytes_total": cum_bytes, "train_bytes_per_round": cum_bytes / cfg.num_rounds,
            "bytes_down_total": int(sum(r["bytes_down"] for r in rows)),
            "bytes_up_total": int(sum(r["bytes_up"] for r in rows)),
            "stragglers_total": int(sum(r["stragglers"] for r in rows)),
            "rejected_total": int(sum(r["rejected"] for r in rows)),
            "tests_at_rounds": extra_tests, "teacher": teacher_info, "wall_seconds": time.perf_counter() - t_start,
        }
        write_json(self.out / "summary.json", summary)
        plot_run(rows, self.out, k=cfg.eval_k, title=cfg.experiment_name)
        log.info("test HR@%d %.4f NDCG@%d %.4f (model of round %d); results in %s", cfg.eval_k,
                 test["hr"], cfg.eval_k, test["ndcg"], best[1], self.out)
        return summary

    def _select(self, nodes: list[Node], r: int) -> list[Node]:
        k = self.cfg.clients_per_round
        if k == 0 or k >= len(nodes):
            return list(nodes)
        idx = np.random.default_rng([self.cfg.seed, 8, r]).choice(len(nodes), size=k, replace=False)
        return [nodes[i] for i in sorted(idx)]

    def _exchange(self, grid: Grid, nodes: list[Node], content: Content, kind: str, r: int):
        """Send one content to many nodes; return (node, reply) pairs without errors and byte counts."""
        rd = pack(content)
        by_id = {n.node_id: n for n in nodes}
        msgs = [Message(rd, dst_node_id=n.node_id, message_type=kind) for n in nodes]
        down = sum(message_nbytes(m) for m in msgs)
        timeout = self.cfg.round_timeout or None
        up, out = 0, []
        for rep in grid.send_and_receive(msgs, timeout=timeout):
            node = by_id.get(rep.metadata.src_node_id)
            if node is None:
                continue
            if rep.has_error():
                self.rejections.append({"round": r, "partition_id": node.partition_id, "node_id": node.node_id,
                                        "reason": f"client error ({kind}): {rep.error.reason}"})
                log.warning("round %d: client %d failed in %s: %s", r, node.partition_id, kind, rep.error.reason)
                continue
            up += message_nbytes(rep)
            out.append((node, rep))
        out.sort(key=lambda p: p[0].partition_id)  # reply order must not change the result
        self.wire_log.append({"round": r, "type": kind, "messages_down": len(msgs), "bytes_down": down,
                              "replies": len(out), "bytes_up": up})
        return out, down, up

    def _evaluate(self, grid: Grid, nodes: list[Node], state, split: str, r: int, *,
                  per_client: str | None = None) -> dict:
        content = Content(arrays={"student": encode_state(state, bits=self.cfg.quant_bits, stochastic=False)},
                          configs={"config": {"split": split, "round": r}})
        replies, down, up = self._exchange(grid, nodes, content, "evaluate", r)
        hr = ndcg = n = 0.0
        table = CsvLog(self.out / per_client) if per_client else None
        for node, rep in replies:
            m = unpack(rep.content).metrics["metrics"]
            hr, ndcg, n = hr + m["hr-sum"], ndcg + m["ndcg-sum"], n + m["count"]
            if table:
                table.append({"partition_id": node.partition_id, "tier": node.tier, "count": int(m["count"]),
                              "hr_sum": m["hr-sum"], "ndcg_sum": m["ndcg-sum"]})
        return {"hr": hr / max(n, 1), "ndcg": ndcg / max(n, 1), "n": int(n), "bytes": down + up}


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"


def _progress(cfg: ExperimentConfig):
    from tqdm.auto import tqdm
    return tqdm(total=cfg.num_rounds, desc=f"fedkd {cfg.experiment_name}", unit="round",
                disable=not cfg.progress, leave=True)
