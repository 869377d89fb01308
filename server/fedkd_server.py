"""The fedkd round loop: what goes down, what comes up, and evaluation through the clients.

Written against Flower's Grid (custom ``train``/``evaluate``/``query`` messages) rather than
a built-in strategy, because a round carries more than one ArrayRecord (student plus proxy
batch with soft labels) and the replies are quantised payloads that must be validated and
decoded before any averaging; Flower's FedAvg expects exactly one float ArrayRecord.

One loop serves every protocol (``protocol`` in the config); they differ only in what a
train message carries and what a reply may carry:

=========  ==========================================  ===============================
protocol   down                                        up
=========  ==========================================  ===============================
params     student + proxy batch with teacher labels    quantised update
logits     proxy batch with teacher/fleet targets,      top-k predictions on the next
           ids of the next proxy batch                  proxy batch
local      proxy batch with teacher labels if kd > 0    metrics only
proxy      nothing (the server distils on the proxy)    nothing
=========  ==========================================  ===============================
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedkd import checkpoint
from fedkd.aggregate import apply_update, combine, norm_outliers, update_norm
from fedkd.codec import REASONS, PayloadError, decode_state, decode_update, encode_state, layout_of, pack_ids
from fedkd.config import ExperimentConfig
from fedkd.fleet import average, densify, distill, ensemble_of_states, predict_dense, top_k
from fedkd.local import ProxyBatch, get_state, set_state
from fedkd.metrics import evaluate_ranking
from fedkd.models import build_model, num_parameters
from fedkd.nested import embed, nested_mean, slice_state, sub_layout
from fedkd.privacy import PrivacyAccountant, accountant_for, noisy_mean, poisson_sample, private_sum
from fedkd.secagg import FRAC_BITS, decode as decode_fixed, unflatten, unmask_sum
from fedkd.schedule import fleet_profiles, select, tier_index, width_for
from fedkd.simtime import (CALIBRATION, ClientTiming, load_calibration, plan_client, round_seconds,
                           round_wall_seconds, step_seconds)
from fedkd.devices import online
from fedkd.plots import plot_run
from fedkd.population import population
from fedkd.proxy import (CacheMirror, build_proxy_set, decode_labels, encode_cached_proxy, encode_full_proxy,
                         encode_proxy, full_distribution, label_digests, round_batch, round_rows, soft_labels)
from fedkd.results import CsvLog, JsonLines, read_metrics, save_student, state_digest, write_json
from fedkd.samples import eval_set, train_samples
from fedkd.teacher import load_or_train
from fedkd.traffic import TrafficMeter, part_of
from clients.wire import Content, describe_message, message_nbytes_by_part, message_payload, pack, unpack

log = logging.getLogger("fedkd")
# Messages whose bytes are the round's training traffic (metrics.csv bytes_*): the train
# message and, with secure aggregation, its key exchange; evaluation is counted apart.
TRAINING_KINDS = ("train", "query.secagg_keys")
# Results files the round loop appends to; a checkpoint records their lengths, and a resume
# cuts them back to those lengths. The files the end of a run writes are rewritten.
APPENDED = ("metrics.csv", "timing.csv", "rejections.jsonl", "wire.jsonl")
REWRITTEN = ("test_per_client*.csv", "summary.json", "student.pt", "student.json", "*.png")
REPLY_SLACK = 64 * 1024  # bytes a reply may carry beyond twice its train message (metrics, framing)


@dataclass(frozen=True)
class Node:
    node_id: int
    partition_id: int
    tier: int
    examples: int


class FedKDServer:
    """Runs one experiment on a Grid and writes its results folder."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path) -> None:
        self.cfg, self.out = cfg, out_dir
        self.metrics = CsvLog(out_dir / "metrics.csv")
        self.timing = CsvLog(out_dir / "timing.csv")  # wall-clock seconds per round: not reproducible
        self.rejections = JsonLines(out_dir / "rejections.jsonl")
        self.wire_log = JsonLines(out_dir / "wire.jsonl")
        (out_dir / "rejections.jsonl").touch()  # present (and empty) when nothing was rejected
        self.teacher = self.proxy = None
        self.teacher_info: dict = {}
        self.fleet: tuple[int, np.ndarray] | None = None  # (round it serves, averaged predictions)
        self.tests: dict[int, dict] = {}  # stateful protocols: test scores of every validated round
        self.trained: set[int] = set()  # partitions whose work was aggregated at least once
        self.traffic = TrafficMeter()  # training bytes by content (docs/communication.md)
        self.mirror = CacheMirror()  # kd-cache: proxy rows and labels each device holds
        self.spent: defaultdict[str, float] = defaultdict(float)  # wall seconds per section this round

    @contextmanager
    def _timed(self, section: str):
        """Add the block's wall time to this round's profile (timing.csv; docs/performance.md)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent[section] += time.perf_counter() - t0

    # ------------------------------------------------------------------ setup
    def _setup_cloud(self) -> None:
        cfg = self.cfg
        pop = population(cfg)  # the server reads cloud users only
        seqs, cloud = pop.dataset.sequences, pop.cloud_users
        self.num_items = pop.dataset.num_items
        if cfg.needs_proxy:
            self.proxy = build_proxy_set(seqs, cloud, size=cfg.proxy_size, max_len=cfg.max_len, seed=cfg.seed)
        if not cfg.needs_teacher:
            return
        self.cloud_train = train_samples([seqs[u][:-2] for u in cloud], cfg.max_len)
        self.cloud_valid = eval_set(seqs, cloud, "valid", cfg.max_len)
        self.teacher, self.teacher_info = load_or_train(
            cfg.teacher_model(self.num_items), cfg.teacher_train(), pop.dataset.fingerprint(),
            self.cloud_train, self.cloud_valid, cache_dir=Path(cfg.cache_dir),
            extra={"cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed},
            progress=lambda row: log.info("teacher epoch %s: loss %.4f, cloud valid NDCG@10 %.4f",
                                          row["epoch"], row["loss"], row["valid_ndcg"]))
        if cfg.teacher_refine_steps:
            self.teacher_opt = torch.optim.Adam(self.teacher.parameters(), lr=cfg.teacher_refine_lr)

    def _setup_fleet(self, nodes: list[Node]) -> None:
        """Device profiles, each device's student width, and the step-time calibration."""
        cfg = self.cfg
        self.full_model = cfg.student_model(self.num_items)
        self.profiles = fleet_profiles(cfg, population(cfg).num_clients)
        self.tier_of = {n.partition_id: tier_index(cfg, self.profiles[n.partition_id]) for n in nodes}
        widths = cfg.widths
        self.width_of = {n.partition_id: width_for(self.profiles[n.partition_id], self.full_model, widths)
                         for n in nodes}
        if cfg.protocol != "params":  # models that stay on devices are full width
            self.width_of = {pid: cfg.student_dim for pid in self.width_of}
        self.calibration = load_calibration(cfg.calibration or CALIBRATION)
        self.up_estimate: dict[int, float] = {}  # width -> bytes of the last reply seen at that width
        self.down_size: dict[int, int] = {}  # width -> bytes of a train message at that width
        self.sim_time = 0.0
        cannot = sorted(pid for pid, w in self.width_of.items() if w is None)
        names = [name for name, _, _ in cfg.tiers]
        for t, name in enumerate(names):
            members = [pid for pid, tt in self.tier_of.items() if tt == t]
            ws = sorted({self.width_of[p] or 0 for p in members})
            log.info("tier %s: %d devices, student width %s", name, len(members),
                     ", ".join(str(w) if w else "none (memory too small: never trains)" for w in ws))
        if len(cannot) == len(nodes):
            raise ValueError("no device's memory holds even the narrowest student: raise tier-memory-mb "
                             "or add narrower student-widths")

    def _handshake(self, grid: Grid) -> list[Node]:
        node_ids = list(grid.get_node_ids())
        msgs = [Message(pack(Content()), dst_node_id=n, message_type="query") for n in node_ids]
        for m in msgs:
            self._audit("down", m, 0, None)
        nodes = []
        for rep in grid.send_and_receive(msgs):
            self._audit("up", rep, 0, None)
            if rep.has_error():
                log.warning("node %s failed the handshake: %s", rep.metadata.src_node_id, rep.error.reason)
                continue
            m = unpack(rep.content).metrics["metrics"]
            nodes.append(Node(rep.metadata.src_node_id, int(m["partition-id"]), int(m["tier"]),
                              int(m["num-examples"])))
        return sorted(nodes, key=lambda n: n.partition_id)

    # ------------------------------------------------------------------ rounds
    def run(self, grid: Grid) -> dict:
        """Run every round (after the checkpointed ones with ``resume``), test, write the summary."""
        cfg, t_start = self.cfg, time.perf_counter()
        self._setup_cloud()
        t_cloud = time.perf_counter()
        student = build_model(cfg.student_model(self.num_items), seed=cfg.seed)
        # Protocols whose models stay on the devices have no global state to send or select.
        self.state = None if cfg.stateful_clients else get_state(student)
        self.layout = layout_of(get_state(student))
        self.student = student
        t_hello = time.perf_counter()
        nodes = self._handshake(grid)
        if not nodes:
            raise RuntimeError("no client answered the handshake; nothing to train")
        self.startup = {"cloud_setup_s": t_cloud - t_start, "handshake_s": time.perf_counter() - t_hello}
        log.info("start-up: teacher and proxy set %.1fs, handshake with %d nodes %.1fs",
                 self.startup["cloud_setup_s"], len(nodes), self.startup["handshake_s"])
        self._setup_fleet(nodes)
        self.accountant = accountant_for(cfg, sum(1 for n in nodes if self.width_of[n.partition_id] is not None))
        self.privacy_stop: dict | None = None
        if self.accountant is not None:
            log.info("differential privacy (%s): clip %.4g, noise multiplier %.4g, sampling rate %.4g, "
                     "epsilon after %d rounds %.4g at delta %g", cfg.dp_mode, cfg.dp_clip_norm,
                     self.accountant.noise_multiplier, self.accountant.rate, cfg.num_rounds,
                     self.accountant.epsilon(cfg.num_rounds), cfg.dp_delta)
        log.info("protocol %s: %d clients, student %d parameters, %d rounds", cfg.protocol, len(nodes),
                 num_parameters(student), cfg.num_rounds)
        t_rounds, cum_bytes = time.perf_counter(), 0
        best = (-1.0, 0, self.state)
        extra_tests: dict[int, dict] = {}
        first = 1
        if cfg.resume:
            first, best, cum_bytes, extra_tests, wall_before = self._restore()
            t_rounds -= wall_before
        bar = _progress(cfg)
        bar.update(first - 1)
        for r in range(first, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            if self._privacy_refuses(r):
                break
            self.spent.clear()
            row = self._train_round(grid, nodes, r)
            cum_bytes += row["bytes_down"] + row["bytes_up"]
            row["cum_bytes"] = cum_bytes
            row.update(self.traffic.close_round())
            if r % cfg.eval_every == 0 or r == cfg.num_rounds or r in cfg.extra_test_rounds:
                with self._timed("validate_s"):
                    ev = self._validate(grid, nodes, r)
                row.update({"val_hr": ev["hr"], "val_ndcg": ev["ndcg"], "eval_bytes": ev["bytes"]})
                if ev["ndcg"] > best[0]:
                    best = (ev["ndcg"], r, self.state)
            else:
                row.update({"val_hr": "", "val_ndcg": "", "eval_bytes": 0})
            if cfg.teacher_refine_steps:
                row["teacher_cloud_val_ndcg"] = (evaluate_ranking(self.teacher, self.cloud_valid, k=cfg.eval_k).ndcg
                                                 if row["val_ndcg"] != "" else "")
            if r in cfg.extra_test_rounds and r != cfg.num_rounds:
                t = self._test(grid, nodes, best, f"test_per_client_r{r}.csv")
                extra_tests[r] = {"best_round": best[1], "hr": t["hr"], "ndcg": t["ndcg"], "train_bytes": cum_bytes}
            row["model_digest"] = state_digest(self.state)
            self.metrics.append(row)  # a pure function of config and seed; wall times go to timing.csv
            timing = {"round": r, "round_s": time.perf_counter() - t0, "wall_s": time.perf_counter() - t_rounds,
                      **{k: round(self.spent[k], 6) for k in PROFILE_SECTIONS}}
            self.timing.append(timing)
            self._checkpoint(r, best, cum_bytes, extra_tests, timing["wall_s"])
            bar.update(1)
            log.info("round %d/%d: val NDCG@%d %s, %d/%d aggregated, %d rejected, %.0f kB down %.0f kB up, %.1fs",
                     r, cfg.num_rounds, cfg.eval_k, _fmt(row["val_ndcg"]), row["aggregated"],
                     row["participants"], row["rejected"], row["bytes_down"] / 1e3, row["bytes_up"] / 1e3,
                     timing["round_s"])
        bar.close()
        if self.privacy_stop and self.privacy_stop["rounds_trained"] > best[1]:  # the last model allowed
            last = self.privacy_stop["rounds_trained"]
            ev = self._validate(grid, nodes, last)
            log.info("privacy stop: model of round %d, val NDCG@%d %.4f", last, cfg.eval_k, ev["ndcg"])
            if ev["ndcg"] > best[0]:
                best = (ev["ndcg"], last, self.state)
        test = self._test(grid, nodes, best, "test_per_client.csv")
        rows = read_metrics(self.out / "metrics.csv") if (self.out / "metrics.csv").exists() else []
        fleet = self._fleet_summary(grid, nodes, best, test, rows)
        summary = {
            "experiment": cfg.experiment_name, "protocol": cfg.protocol, "clients": len(nodes),
            "clients_trained": len(self.trained),
            "rounds": cfg.num_rounds, "student_parameters": num_parameters(student), "best_round": best[1],
            "best_val_ndcg": best[0], f"test_hr@{cfg.eval_k}": test["hr"],
            f"test_ndcg@{cfg.eval_k}": test["ndcg"], "test_users": test["n"],
            "train_bytes_total": cum_bytes, "train_bytes_per_round": cum_bytes / cfg.num_rounds,
            "bytes_down_total": int(sum(r["bytes_down"] for r in rows)),
            "bytes_up_total": int(sum(r["bytes_up"] for r in rows)),
            "stragglers_total": int(sum(r["stragglers"] for r in rows)),
            "rejected_total": int(sum(r["rejected"] for r in rows)),
            "tests_at_rounds": extra_tests, "teacher": self.teacher_info, **fleet, **self._privacy_summary(),
            "wall_seconds": time.perf_counter() - t_start, "startup": self.startup,
        }
        if cfg.teacher_refine_steps:
            summary["teacher_cloud_val_ndcg_final"] = evaluate_ranking(self.teacher, self.cloud_valid,
                                                                       k=cfg.eval_k).ndcg
        if best[2] is not None:  # the chosen global student, for `fedkd export` and later analysis
            save_student(self.out, best[2], self.full_model)
        write_json(self.out / "summary.json", summary)
        plot_run(rows, self.out, k=cfg.eval_k, title=cfg.experiment_name)
        log.info("test HR@%d %.4f NDCG@%d %.4f (model of round %d); results in %s", cfg.eval_k,
                 test["hr"], cfg.eval_k, test["ndcg"], best[1], self.out)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, r: int, best: tuple, cum_bytes: int, extra_tests: dict, wall_s: float) -> None:
        """Everything the next round needs, written atomically once round ``r`` is in the results."""
        opt = getattr(self, "student_opt", None)
        checkpoint.save(self.out, {
            "round": r, "config": self.cfg.to_flat(), "state": self.state, "best": best, "cum_bytes": cum_bytes,
            "extra_tests": extra_tests, "wall_s": wall_s, "trained": sorted(self.trained),
            "sim_time": self.sim_time, "up_estimate": dict(self.up_estimate), "fleet": self.fleet,
            "tests": self.tests, "teacher_info": self.teacher_info,
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "teacher_opt": self.teacher_opt.state_dict() if hasattr(self, "teacher_opt") else None,
            "student_opt": opt.state_dict() if opt is not None else None,
            "traffic_total": self.traffic.total, "mirror": self.mirror,
            "accountant": self.accountant.to_dict() if self.accountant is not None else None,
            "files": checkpoint.file_sizes(self.out, APPENDED + tuple(
                p.name for p in sorted(self.out.glob("test_per_client_r*.csv"))))})

    def _restore(self) -> tuple[int, tuple, int, dict, float]:
        """Load the last checkpoint into this server and cut the results files back to it."""
        ck = checkpoint.load(self.out, self.cfg.to_flat())
        checkpoint.truncate(self.out, ck["files"], REWRITTEN)
        self.metrics, self.timing = CsvLog(self.out / "metrics.csv"), CsvLog(self.out / "timing.csv")
        self.state, self.trained, self.sim_time = ck["state"], set(ck["trained"]), ck["sim_time"]
        self.up_estimate, self.fleet, self.tests = dict(ck["up_estimate"]), ck["fleet"], ck["tests"]
        self.teacher_info = ck["teacher_info"]
        if ck["teacher"] is not None:
            self.teacher.load_state_dict(ck["teacher"])
        if ck["teacher_opt"] is not None:
            self.teacher_opt.load_state_dict(ck["teacher_opt"])
        if self.cfg.protocol == "proxy":  # the server's student is the live model only here
            set_state(self.student, self.state)
        if ck["student_opt"] is not None:  # proxy protocol: the server's own optimiser
            self._server_distill_setup()
            self.student_opt.load_state_dict(ck["student_opt"])
        self.traffic.total, self.mirror = ck["traffic_total"], ck["mirror"]
        if ck["accountant"] is not None:
            self.accountant = PrivacyAccountant.from_dict(ck["accountant"])
        checkpoint.set_rng_states(ck["rng"])
        log.info("resumed after round %d of %d from %s", ck["round"], self.cfg.num_rounds,
                 self.out / checkpoint.NAME)
        return ck["round"] + 1, ck["best"], ck["cum_bytes"], ck["extra_tests"], ck["wall_s"]

    def _fleet_summary(self, grid: Grid, nodes: list[Node], best: tuple, test: dict, rows: list[dict]) -> dict:
        """Per tier: test NDCG of the model each device runs, participation, stragglers; the
        simulated time; and, with mixed widths, the full global student on every user."""
        cfg, k = self.cfg, self.cfg.eval_k
        out: dict = {"sim_time_s": self.sim_time, "tiers": {}}
        for t, (name, _, _) in enumerate(cfg.tiers):
            rs = [r for r in test["rows"] if r["tier"] == t]
            n = sum(r["count"] for r in rs)
            out["tiers"][name] = {
                "devices": sum(1 for tt in self.tier_of.values() if tt == t),
                "widths": sorted({self.width_of[p] or 0 for p, tt in self.tier_of.items() if tt == t}),
                f"test_ndcg@{k}": sum(r["ndcg_sum"] for r in rs) / max(n, 1),
                f"test_hr@{k}": sum(r["hr_sum"] for r in rs) / max(n, 1), "test_users": n,
                **{key: int(sum(row.get(f"{key}_{name}", 0) for row in rows))
                   for key in ("participants", "aggregated", "stragglers")}}
        if best[2] is not None and any(self.width_of[n.partition_id] != cfg.student_dim for n in nodes):
            full = self._evaluate(grid, nodes, best[2], ("test",), best[1], full_width=True)["test"]
            CsvLog(self.out / "test_per_client_full_width.csv").extend(full["rows"])
            out[f"test_ndcg@{k}_full_width"] = full["ndcg"]
            out[f"test_hr@{k}_full_width"] = full["hr"]
            for t, (name, _, _) in enumerate(cfg.tiers):
                rs = [r for r in full["rows"] if r["tier"] == t]
                out["tiers"][name][f"test_ndcg@{k}_full_width"] = (sum(r["ndcg_sum"] for r in rs)
                                                                   / max(sum(r["count"] for r in rs), 1))
        return out

    def _train_round(self, grid: Grid, nodes: list[Node], r: int) -> dict:
        """One round of training under the configured protocol; returns its metrics row so far."""
        cfg = self.cfg
        rows = (round_rows(len(self.proxy), round_idx=r, size=cfg.proxy_batch, seed=cfg.seed)
                if self.proxy is not None else None)
        batch = self.proxy[rows] if rows is not None else None  # = round_batch(...)
        if cfg.protocol == "proxy":
            loss = self._server_distill(r)
            row = {"round": r, "online": 0, "participants": 0, "replied": 0, "stragglers": 0, "rejected": 0,
                   "aggregated": 0, "skipped": 0, "norm_bounded": 0, "train_loss": loss, "bytes_down": 0,
                   "bytes_up": 0, "sim_round_s": 0.0, "sim_time_s": self.sim_time,
                   **{f"rejected_{code}": 0 for code in REASONS}}
            return {**row, **self._tier_steps({})}
        t_prepare = time.perf_counter()
        content = Content(configs={"config": {"round": r}})
        with self._timed("targets_s"):
            targets = self._targets(batch, r)
        cache = None  # kd-cache: (rows, histories, labels, label digests) of this round's batch
        if targets is not None and cfg.soft_label_format == "full":
            content.arrays["proxy"] = encode_full_proxy(batch, targets, num_items=self.num_items)
        elif targets is not None:
            content.arrays["proxy"] = encode_proxy(batch, targets, num_items=self.num_items,
                                                   bits=cfg.soft_label_bits)
            if cfg.kd_cache:
                cache = (rows, batch, targets, label_digests(targets, num_items=self.num_items,
                                                             bits=cfg.soft_label_bits))
                content.configs["config"]["proxy-size"] = len(self.proxy)
        if targets is not None:
            content.configs["config"]["proxy-rows"] = len(batch)
        nxt = None
        if cfg.protocol == "logits":
            nxt = round_batch(self.proxy, round_idx=r + 1, size=cfg.proxy_batch, seed=cfg.seed)
            content.arrays["next"] = {"histories": pack_ids(nxt, self.num_items)}
            content.configs["config"]["next-rows"] = len(nxt)
        by_width = self._contents_by_width(content, self.state)
        self.down_size = {}
        online_nodes = [n for n in nodes if self.width_of[n.partition_id] is not None
                        and online(self.profiles[n.partition_id], cfg.seed, r, n.partition_id)]
        plans = {n.partition_id: self._plan(n, by_width) for n in online_nodes}
        if self.accountant is not None and cfg.dp_mode == "local":  # devices out of budget sit out
            online_nodes = [n for n in online_nodes if not self.accountant.exhausted(n.partition_id)]
        if self.accountant is not None and cfg.dp_mode == "central":  # what the amplification bound assumes
            chosen = set(poisson_sample([n.partition_id for n in online_nodes], self.accountant.rate,
                                        np.random.default_rng([cfg.seed, 8, r])))
        else:
            chosen = set(select([n.partition_id for n in online_nodes], cfg.clients_per_round,
                                rng=np.random.default_rng([cfg.seed, 8, r]), policy=cfg.selection,
                                tier_of=self.tier_of, finishes={p: not t.straggler for p, t in plans.items()}))
        selected = [n for n in online_nodes if n.partition_id in chosen]
        sent = [n for n in selected if plans[n.partition_id].used]
        key_set, key_bytes = None, (0, 0)
        if cfg.secure_aggregation:  # step 1: this round's key holders; who fails here is not sent work
            sent, key_set, key_bytes = self._secagg_keys(grid, sent, by_width, r)
        items = [(n, self._with_steps(self._cached(n, by_width[self.width_of[n.partition_id]], cache),
                                      plans[n.partition_id].steps)) for n in sent]
        self.spent["prepare_s"] += time.perf_counter() - t_prepare
        replies, down, up, sizes = self._exchange(grid, items, "train", r)
        down, up = down + key_bytes[0], up + key_bytes[1]
        down += sum(self._nbytes(self._cached(n, by_width[self.width_of[n.partition_id]], cache), count=True)
                    for n in selected if n not in sent)
        if cache is not None:  # a reply means the device stored the rows before it trained
            replied = {n.partition_id for n, _ in replies}
            for n in sent:
                if n.partition_id in replied:
                    self.mirror.commit(n.partition_id, cache[0], cache[3])
                else:
                    self.mirror.forget(n.partition_id)
        timings, late = self._clock(selected, plans, sizes, replies)
        released = [n.partition_id for n, _ in replies]  # local DP: every noisy update sent counts
        replies = [(n, rep) for n, rep in replies if n.partition_id not in late]
        failed = dict(self.failed)  # crashed or timed out: no usable reply
        with self._timed("accept_s"):
            accepted, rejected = self._accept(replies, r, rows=len(nxt) if nxt is not None else 0,
                                              allowed={n.partition_id: plans[n.partition_id].steps for n in sent},
                                              sizes=sizes)
        self.spent["client_train_s"] += sum(float(m.get("train-seconds", 0.0)) for _, m, _ in accepted)
        rejected.update(failed)
        skipped = len(accepted) < cfg.min_replies
        if skipped:
            log.warning("round %d skipped: %d valid train replies, min-replies is %d; the model is unchanged "
                        "(%d rejected: %s)", r, len(accepted), cfg.min_replies, len(rejected),
                        ", ".join(f"{c} x{list(rejected.values()).count(c)}" for c in sorted(set(rejected.values())))
                        or "none")
            accepted = []
        payloads = [p for _, _, p in accepted]
        fleet_view = None  # (proxy histories, the fleet's averaged predictions on them)
        if accepted and cfg.protocol == "params":
            weights = [float(m["num-examples"]) for _, m, _ in accepted]
            widths = [self.width_of[n.partition_id] for n, _, _ in accepted]
            if cfg.teacher_refine_steps:  # FedDF: the ensemble of this round's (full-width) client models
                start = decode_state(encode_state(self.state, bits=cfg.student_bits, stochastic=False,
                                                  per_row=cfg.per_row), self.layout,
                                     bits=cfg.student_bits, per_row=cfg.per_row)
                models = [{k: start[k] + u[k] for k in start} for u, w in zip(payloads, widths)
                          if w == cfg.student_dim]
                if models:
                    fleet_view = (batch, ensemble_of_states(self.student, models, batch,
                                                            temperature=cfg.kd_temperature))
            if cfg.dp_mode == "local":  # noisy on the device already; equal weights (example counts are private)
                weights = [1.0] * len(payloads)
            bounded = 0
            if cfg.dp_mode != "central" and not cfg.secure_aggregation:  # those aggregate below
                with self._timed("aggregate_s"):
                    update, factors = combine([(n.partition_id, w, p, wt) for (n, _, _), w, p, wt
                                               in zip(accepted, widths, payloads, weights)], self.full_model,
                                              aggregation=cfg.aggregation, trim_fraction=cfg.trim_fraction,
                                              norm_bound=cfg.norm_bound)
                    self.state = apply_update(self.state, update, cfg.server_lr)
                bounded = sum(f < 1 for f in factors)
        secure_total = None
        if cfg.secure_aggregation and cfg.protocol == "params":
            secure_total = self._secure_sum(accepted, payloads, key_set, r)
            if secure_total is not None and accepted and cfg.dp_mode != "central":  # the plain mean of the sum
                self.state = apply_update(self.state, {k: (v / len(accepted)).astype(np.float32)
                                                       for k, v in secure_total.items()}, cfg.server_lr)
        dp_row = {}
        if self.accountant is not None and cfg.protocol == "params":
            dp_row = self._private_release(accepted, payloads, released, r, secure_total)
        if accepted and cfg.protocol == "logits":
            self.fleet = (r + 1, average([densify(p, self.num_items) for p in payloads]))
            fleet_view = (nxt, self.fleet[1])
        refine_loss = self._refine_teacher(*fleet_view, r) if fleet_view and cfg.teacher_refine_steps else ""
        steps: dict[int, list[int]] = {}
        self.trained.update(node.partition_id for node, _, _ in accepted)
        for node, m, _ in accepted:
            steps.setdefault(self.tier_of[node.partition_id], []).append(int(m["steps"]))
        round_s = round_wall_seconds(timings.values(), cfg.round_deadline)
        self.sim_time += round_s
        stragglers = ({n.partition_id for n in selected} - {n.partition_id for n, _, _ in accepted}
                      - {n.partition_id for n, _ in replies} - set(failed))  # dropped by the deadline, or late
        row = {"round": r, "online": len(online_nodes), "participants": len(selected), "replied": len(replies),
               "stragglers": len(stragglers), "rejected": len(rejected), "aggregated": len(accepted),
               "skipped": int(skipped), "norm_bounded": bounded if accepted and cfg.protocol == "params" else 0,
               "train_loss": _mean(float(m["loss"]) for _, m, _ in accepted), "bytes_down": down, "bytes_up": up,
               "sim_round_s": round_s, "sim_time_s": self.sim_time,
               **{f"rejected_{code}": list(rejected.values()).count(code) for code in REASONS}}
        if cfg.teacher_refine_steps:
            row["teacher_refine_loss"] = refine_loss
        row.update(dp_row)
        per_tier = {"participants": [n.partition_id for n in selected], "stragglers": sorted(stragglers),
                    "aggregated": [n.partition_id for n, _, _ in accepted]}
        return {**row, **self._tier_steps(steps, per_tier)}

    # ------------------------------------------------------------------ differential privacy
    def _privacy_refuses(self, r: int) -> bool:
        """Central DP with a budget: refuse round ``r`` if its release would take epsilon past
        the target, and say so in the log and the summary (training stops; the run goes on to
        test the model chosen so far)."""
        acc = self.accountant
        if acc is None or not acc.target_epsilon:
            return False
        if acc.mode == "local":  # devices out of budget sit out; stop when none is left
            pids = [p for p, w in self.width_of.items() if w is not None]
            if not all(acc.exhausted(p) for p in pids):
                return False
            eps = acc.would_exceed(pids)[1]
        else:
            over, eps = acc.would_exceed()
            if not over:
                return False
        self.privacy_stop = {"round_refused": r, "rounds_trained": r - 1, "epsilon_spent": acc.epsilon(),
                             "epsilon_next": eps, "target_epsilon": acc.target_epsilon, "delta": acc.delta,
                             "reason": f"round {r} would raise epsilon from {acc.epsilon():.4g} to {eps:.4g}, over "
                                       f"the target {acc.target_epsilon:g} at delta {acc.delta:g}; training "
                                       f"stopped after round {r - 1}"}
        log.warning("privacy budget: %s", self.privacy_stop["reason"])
        return True

    def _private_release(self, accepted, payloads, released: list[int], r: int, secure_total=None) -> dict:
        """Central DP: clip each decoded update (embedded at full width), add noise to the sum,
        divide by the expected number of participants. Local DP: the updates came noisy; only
        count who released one. Either way, record the release and write the accountant.
        With secure aggregation the devices clipped and the server only has the sum; a round
        whose sum was void releases nothing and costs nothing."""
        cfg, acc = self.cfg, self.accountant
        norms: list[float] = []
        if acc.mode == "central" and cfg.secure_aggregation and secure_total is None:
            return {"dp_epsilon": acc.epsilon(), "dp_clipped": "", "dp_norm_median": ""}
        if acc.mode == "central":
            full = [embed(u, self.full_model, self.width_of[n.partition_id])[0] if
                    self.width_of[n.partition_id] != cfg.student_dim else u for (n, _, _), u in zip(accepted, payloads)]
            total, norms = (secure_total, []) if cfg.secure_aggregation else private_sum(full, cfg.dp_clip_norm)
            eligible = sum(1 for w in self.width_of.values() if w is not None)
            update = noisy_mean(total, std=acc.noise_multiplier * cfg.dp_clip_norm, denominator=acc.rate * eligible,
                                rng=np.random.default_rng([cfg.seed, 11, r]), template=self.state)
            self.state = apply_update(self.state, update, cfg.server_lr)
            acc.record()
        else:
            acc.record(released)
        write_json(self.out / "privacy.json", acc.report())
        eps = acc.epsilon()
        return {"dp_epsilon": eps, "dp_clipped": sum(1 for x in norms if x > cfg.dp_clip_norm) if norms else "",
                "dp_norm_median": float(np.median(norms)) if norms else ""}

    def _secagg_keys(self, grid: Grid, sent: list[Node], by_width: dict, r: int):
        """Secure aggregation, step 1: every node about to train makes a key pair and sends its
        public key; the sorted (partition id, key) list goes into the round's train messages.
        Returns the nodes that answered, their partition ids, and the step's (down, up) bytes."""
        ask = Content(configs={"config": {"round": r}})
        replies, down, up, _ = self._exchange(grid, [(n, ask) for n in sent], "query.secagg_keys", r)
        keys = {}
        for node, rep in replies:
            pub = unpack(rep.content).arrays.get("secagg", {}).get("public")
            if pub is not None and pub.dtype == np.uint8 and pub.shape == (32,):
                keys[node.partition_id] = pub
            else:
                self.rejections.append({"round": r, "partition_id": node.partition_id, "node_id": node.node_id,
                                        "reason": "secure aggregation: no valid 32-byte public key"})
        ids = sorted(keys)
        peers = {"ids": np.asarray(ids, np.int64), "keys": np.stack([keys[i] for i in ids]) if ids
                 else np.zeros((0, 32), np.uint8)}
        for c in by_width.values():
            c.arrays["peers"] = peers
        return [n for n in sent if n.partition_id in keys], ids, (down, up)

    def _secure_sum(self, accepted, payloads, key_set: list[int], r: int) -> dict | None:
        """Secure aggregation, step 2: the sum of the masked uploads, unmasked by cancellation
        and decoded to the full student's shapes; None (round void, logged) if a key holder's
        upload is missing: without secret sharing its masks cannot be removed."""
        masked = {n.partition_id: p for (n, _, _), p in zip(accepted, payloads)}
        if not key_set:
            return {k: np.zeros(v.shape, np.float64) for k, v in self.state.items()}
        try:
            total = decode_fixed(unmask_sum(masked, key_set), FRAC_BITS)
        except ValueError as exc:
            self.rejections.append({"round": r, "partition_id": None, "node_id": None, "reason": str(exc)})
            log.warning("round %d: %s; the round's update is void", r, exc)
            return None
        return unflatten(total, sub_layout(self.full_model, self.cfg.student_dim))

    def _privacy_summary(self) -> dict:
        if self.accountant is None:
            return {}
        eps = self.accountant.epsilon()
        return {"dp_epsilon": eps if np.isfinite(eps) else "inf",
                "privacy": {**self.accountant.report(), "stopped": self.privacy_stop}}

    def _tier_steps(self, steps: dict[int, list[int]], per_tier: dict[str, list[int]] | None = None) -> dict:
        out = {}
        for t, (name, _, _) in enumerate(self.cfg.tiers):
            out[f"steps_mean_{name}"] = _mean(steps.get(t, []))
            out[f"steps_max_{name}"] = max(steps.get(t, [0]))
            for key, pids in (per_tier or {"participants": [], "stragglers": [], "aggregated": []}).items():
                out[f"{key}_{name}"] = sum(1 for p in pids if self.tier_of.get(p) == t)
        return out

    # ------------------------------------------------------------------ devices and the clock
    def _contents_by_width(self, content: Content, state, widths=None) -> dict[int, Content]:
        """The round's content for each student width in use (one encoding per width)."""
        out = {}
        for w in widths or sorted({w for w in self.width_of.values() if w is not None}):
            c = Content(arrays=dict(content.arrays), configs={k: dict(v) for k, v in content.configs.items()})
            c.configs["config"]["width"] = w
            if state is not None:
                c.arrays["student"] = encode_state(slice_state(state, self.full_model, w),
                                                   bits=self.cfg.student_bits, stochastic=False,
                                                   per_row=self.cfg.per_row)
            out[w] = c
        return out

    @staticmethod
    def _with_steps(content: Content, steps: int) -> Content:
        return Content(arrays=content.arrays, configs={"config": {**content.configs["config"], "steps": steps}})

    def _cached(self, node: Node, content: Content, cache) -> Content:
        """kd-cache: the content with its proxy batch cut to what this device does not hold yet."""
        if cache is None:
            return content
        rows, batch, labels, digests = cache
        need_hist, need_label = self.mirror.delta(node.partition_id, rows, digests)
        arrays = dict(content.arrays)
        arrays["proxy"] = encode_cached_proxy(rows, batch, labels, need_hist, need_label, proxy_len=len(self.proxy),
                                              num_items=self.num_items, bits=self.cfg.soft_label_bits)
        return Content(arrays=arrays, configs=content.configs)

    def _nbytes(self, content: Content, *, count: bool = False) -> int:
        """Bytes of a train message with this content; ``count`` adds them to the round's traffic
        (a device dropped before it was sent anything still downloads its message)."""
        parts = message_nbytes_by_part(Message(pack(content), dst_node_id=0, message_type="train"), part_of)
        if count:
            self.traffic.add("down", parts)
        return sum(parts.values())

    def _plan(self, node: Node, by_width: dict[int, Content]) -> ClientTiming:
        """Steps that fit this device's round, from the message it would get and its profile."""
        cfg, pid = self.cfg, node.partition_id
        w = self.width_of[pid]
        max_steps = cfg.tiers[self.tier_of[pid]][2]
        probe = self._with_steps(by_width[w], max_steps)
        if w not in self.down_size:
            self.down_size[w] = self._nbytes(probe)
        up = self.up_estimate.get(w, self.down_size[w] - sum(a.nbytes for k, arrs in probe.arrays.items()
                                                               if k != "student" for a in arrs.values()))
        return plan_client(self.profiles[pid], down_bytes=self.down_size[w], up_bytes=up,
                           step_seconds=step_seconds(self.calibration, w), max_steps=max_steps,
                           deadline_s=cfg.round_deadline, min_steps=min(cfg.min_steps, max_steps),
                           policy=cfg.straggler_policy)

    def _clock(self, selected: list[Node], plans: dict[int, ClientTiming], sizes: dict[int, tuple[int, int]],
               replies) -> tuple[dict[int, ClientTiming], set[int]]:
        """Simulated time of each selected device from the bytes actually sent and received.

        A device whose real reply turned out larger than planned and so missed the deadline
        is late: a straggler like the others, its work not used."""
        cfg, timings, late = self.cfg, {}, set()
        replied = {n.partition_id for n, _ in replies}
        for n in selected:
            pid, plan = n.partition_id, plans[n.partition_id]
            if pid not in sizes or pid not in replied:
                timings[pid] = plan
                continue
            down, up = sizes[pid]
            w = self.width_of[pid]
            self.up_estimate[w] = up
            total = round_seconds(down, up, plan.steps, step_seconds(self.calibration, w), self.profiles[pid])
            timings[pid] = ClientTiming(plan.download_s, plan.compute_s, plan.upload_s, total, plan.steps,
                                        plan.straggler)
            if cfg.round_deadline and total > cfg.round_deadline * (1 + 1e-9):
                late.add(pid)
        return timings, late

    def _targets(self, batch: np.ndarray | None, r: int):
        """Distillation targets for this round's proxy batch, or None for no distillation."""
        cfg = self.cfg
        if batch is None or cfg.kd_weight == 0:
            return None
        if cfg.protocol != "logits" and cfg.soft_label_format == "full":
            return full_distribution(self.teacher, batch, temperature=cfg.kd_temperature)
        if cfg.protocol != "logits":
            return soft_labels(self.teacher, batch, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
        w = cfg.fd_teacher_weight if self.teacher is not None else 0.0
        fleet = self.fleet[1] if self.fleet is not None and self.fleet[0] == r else None
        if fleet is None:  # first round: nothing from the fleet yet
            return (soft_labels(self.teacher, batch, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
                    if w > 0 else None)
        if w > 0:
            fleet = w * predict_dense(self.teacher, batch, temperature=cfg.kd_temperature) + (1 - w) * fleet
        return top_k(fleet, cfg.kd_top_k)

    def _accept(self, replies, r: int, *, rows: int, allowed: dict[int, int],
                sizes: dict[int, tuple[int, int]]) -> tuple[list, dict[int, str]]:
        """Validate and decode replies; a bad one is logged with its reason code and left out.

        Every check raises :class:`PayloadError` with a code from ``fedkd.codec.REASONS``, in
        the order a careful server would run them: size before decoding, metrics, the step
        count, then the payload against this server's own layout. Steps are checked against
        the allowance this server sent, not the limit the client reports, so a device cannot
        grant itself more work than it was given. Last, with ``norm-reject``, updates far
        above the round's median norm are refused (a comparison across replies, so it runs
        after all of them are decoded). Returns the accepted ``(node, metrics, payload)``
        triples and the reason code of every rejected partition."""
        cfg = self.cfg
        accepted, rejected = [], {}
        for node, rep in replies:
            pid = node.partition_id
            try:
                down, up = sizes[pid]
                limit = cfg.max_reply_bytes or 2 * down + REPLY_SLACK
                if up > limit:
                    raise PayloadError("oversized", f"reply of {up} bytes exceeds the limit of {limit} bytes")
                got = unpack(rep.content)
                m = _reply_metrics(got)
                if not 0 <= m["steps"] <= allowed[pid]:
                    raise PayloadError("steps", f"reports {m['steps']} steps; it was allowed {allowed[pid]}")
                accepted.append((node, m, self._payload(got, rows, self.width_of[pid])))
            except PayloadError as exc:
                rejected[pid] = self._reject(r, node, "train", exc)
        if cfg.norm_reject and cfg.protocol == "params" and accepted:
            norms = [update_norm(p) for _, _, p in accepted]
            median = float(np.median(norms))
            keep = []
            for (node, m, p), n, out in zip(accepted, norms, norm_outliers(norms, cfg.norm_reject)):
                if out:
                    rejected[node.partition_id] = self._reject(r, node, "train", PayloadError(
                        "norm", f"update norm {n:.4g} exceeds norm-reject {cfg.norm_reject:g} x the round's "
                                f"median {median:.4g}"))
                else:
                    keep.append((node, m, p))
            accepted = keep
        return accepted, rejected

    def _payload(self, got: Content, rows: int, width: int):
        cfg = self.cfg
        for name, arrays in got.arrays.items():  # one rule for every float the server will use
            for key, a in arrays.items():
                if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                    raise PayloadError("non-finite", f"'{name}/{key}' holds non-finite values (NaN or inf)")
        if cfg.protocol == "params" and cfg.secure_aggregation:
            masked = got.arrays.get("masked", {}).get("values")
            size = sum(int(np.prod(s)) for s in sub_layout(self.full_model, cfg.student_dim).values())
            if masked is None or set(got.arrays) != {"masked"} or masked.dtype != np.uint32 or masked.shape != (size,):
                raise PayloadError("malformed", f"secure aggregation expects only masked/values, uint32 ({size},)")
            return masked
        if cfg.protocol == "params":
            if set(got.arrays) - {"update"}:
                raise PayloadError("unexpected-key", f"unexpected arrays {sorted(set(got.arrays) - {'update'})}")
            if "update" not in got.arrays:
                raise PayloadError("missing-key", "reply lacks its update ('update')")
            return decode_update(got.arrays["update"], sub_layout(self.full_model, width), bits=cfg.quant_bits,
                                 per_row=cfg.per_row, density=cfg.update_density)
        if cfg.protocol == "logits":
            if "preds" not in got.arrays:
                raise PayloadError("missing-key", "reply lacks its predictions ('preds')")
            try:
                return decode_labels(got.arrays["preds"], rows=rows, top_k=cfg.kd_top_k, num_items=self.num_items,
                                     bits=cfg.soft_label_bits)
            except PayloadError:
                raise
            except ValueError as exc:  # the soft-label decoder's own invariants (ids, probabilities)
                raise PayloadError("malformed", str(exc)) from None
        if got.arrays:
            raise PayloadError("unexpected-key", f"protocol {cfg.protocol} uploads no arrays, got {sorted(got.arrays)}")
        return None

    def _refine_teacher(self, histories: np.ndarray, fleet: np.ndarray, r: int) -> float:
        """FedDF/FedGKT step: fit the teacher to the fleet's predictions, and to its own cloud data."""
        cfg = self.cfg
        t = top_k(fleet, cfg.kd_top_k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((cfg.seed, 9, r)) % 2**31)  # dropout masks
            return distill(self.teacher, self.teacher_opt, ProxyBatch(histories, t.ids, t.probs),
                           steps=cfg.teacher_refine_steps, kd_batch_size=cfg.kd_batch_size,
                           temperature=cfg.kd_temperature, rng=np.random.default_rng([cfg.seed, 9, r]),
                           private=self.cloud_train, batch_size=cfg.teacher_batch_size)

    def _server_distill_setup(self) -> None:
        if not hasattr(self, "proxy_labels"):
            cfg = self.cfg
            sl = soft_labels(self.teacher, self.proxy, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
            self.proxy_labels = ProxyBatch(self.proxy, sl.ids, sl.probs)
            self.student_opt = torch.optim.Adam(self.student.parameters(), lr=cfg.server_distill_lr)

    def _server_distill(self, r: int) -> float:
        """Proxy-only baseline: the student learns the teacher's labels on the whole proxy set."""
        cfg = self.cfg
        self._server_distill_setup()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((cfg.seed, 10, r)) % 2**31)
            loss = distill(self.student, self.student_opt, self.proxy_labels, steps=cfg.server_distill_steps,
                           kd_batch_size=cfg.kd_batch_size, temperature=cfg.kd_temperature,
                           rng=np.random.default_rng([cfg.seed, 10, r]))
        self.state = get_state(self.student)
        return loss

    def _exchange(self, grid: Grid, items: list[tuple[Node, Content]], kind: str, r: int):
        """Send each node its content; return (node, reply) pairs without errors, the byte totals,
        and per partition id the (down, up) bytes of its messages."""
        with self._timed("exchange_s"):
            return self._exchange_timed(grid, items, kind, r)

    def _exchange_timed(self, grid: Grid, items: list[tuple[Node, Content]], kind: str, r: int):
        packed: dict[int, object] = {}  # one RecordDict per distinct content
        msgs, sizes = [], {}
        for n, c in items:
            rd = packed.setdefault(id(c), pack(c))
            msgs.append(Message(rd, dst_node_id=n.node_id, message_type=kind))
        for (n, _), m in zip(items, msgs):
            parts = self._audit("down", m, r, n.partition_id)
            if kind in TRAINING_KINDS:
                self.traffic.add("down", parts)
            sizes[n.partition_id] = (sum(parts.values()), 0)
        by_id = {n.node_id: n for n, _ in items}
        down = sum(d for d, _ in sizes.values())
        timeout = self.cfg.round_timeout or None
        up, out, failed, answered, errors = 0, [], {}, set(), []
        for rep in grid.send_and_receive(msgs, timeout=timeout) if msgs else []:
            node = by_id.get(rep.metadata.src_node_id)
            if node is None:
                continue
            parts = self._audit("up", rep, r, node.partition_id)
            answered.add(node.partition_id)
            if rep.has_error():  # the ClientApp raised (or the engine lost it): Flower's error reply
                errors.append((node, PayloadError("crashed", f"error code {rep.error.code}: "
                                                             f"{rep.error.reason[-300:]}")))
                continue
            if kind in TRAINING_KINDS:
                self.traffic.add("up", parts)
            nbytes = sum(parts.values())
            up += nbytes
            sizes[node.partition_id] = (sizes[node.partition_id][0], nbytes)
            out.append((node, rep))
        errors += [(n, PayloadError("timeout", f"no {kind} reply within round-timeout ({self.cfg.round_timeout:g} s)"))
                   for n, _ in items if n.partition_id not in answered]
        for n, err in sorted(errors, key=lambda e: e[0].partition_id):  # logged in partition order, not arrival
            failed[n.partition_id] = self._reject(r, n, kind, err)
        out.sort(key=lambda p: p[0].partition_id)  # reply order must not change the result
        self.failed = failed  # partition id -> reason code of the nodes that sent no usable reply
        return out, down, up, sizes

    def _audit(self, direction: str, msg: Message, r: int, partition_id: int | None) -> dict[str, int]:
        """One wire.jsonl line per message, in both directions (docs/privacy.md), and with
        ``wire-payloads`` every value it carries; returns its serialised size in bytes split by
        content (docs/communication.md), which sums to the message's size."""
        with self._timed("audit_s"):
            return self._audit_timed(direction, msg, r, partition_id)

    def _audit_timed(self, direction: str, msg: Message, r: int, partition_id: int | None) -> dict[str, int]:
        parts = {} if msg.has_error() else message_nbytes_by_part(msg, part_of)
        nbytes = sum(parts.values())
        seq = self.wire_seq = getattr(self, "wire_seq", 0) + 1
        node = msg.metadata.dst_node_id if direction == "down" else msg.metadata.src_node_id
        line = {"seq": seq, "round": r, "direction": direction, "node_id": node, "partition_id": partition_id,
                "bytes": nbytes}
        if msg.has_error():
            line.update(type=msg.metadata.message_type, error=msg.error.reason)
        else:
            line.update(describe_message(msg))
            if self.cfg.wire_payloads:
                (self.out / "wire").mkdir(exist_ok=True)
                np.savez(self.out / "wire" / f"{seq:07d}.npz", **message_payload(msg))
        self.wire_log.append(line)
        return parts

    def _reject(self, r: int, node: Node, kind: str, err: PayloadError) -> str:
        """Log one refused or missing reply with its reason code; returns the code."""
        self.rejections.append({"round": r, "partition_id": node.partition_id, "node_id": node.node_id,
                                "type": kind, "reason": err.code, "detail": err.detail})
        log.warning("round %d: %s reply of client %d rejected (%s): %s", r, kind, node.partition_id, err.code,
                    err.detail[:200])
        return err.code

    # ------------------------------------------------------------------ evaluation
    def _validate(self, grid: Grid, nodes: list[Node], r: int) -> dict:
        """Validation through the clients. Where the models live on the devices, the test split is
        scored in the same message and kept, to be reported only for the round validation picks."""
        if self.state is not None:
            return self._evaluate(grid, nodes, self.state, ("valid",), r)["valid"]
        ev = self._evaluate(grid, nodes, None, ("valid", "test"), r)
        self.tests[r] = ev["test"]
        return ev["valid"]

    def _test(self, grid: Grid, nodes: list[Node], best: tuple, per_client: str) -> dict:
        _, r, state = best
        res = self.tests[r] if state is None else self._evaluate(grid, nodes, state, ("test",), r)["test"]
        table = CsvLog(self.out / per_client)
        table.extend(res["rows"])
        return res

    def _evaluate(self, grid: Grid, nodes: list[Node], state, splits: tuple[str, ...], r: int, *,
                  full_width: bool = False) -> dict:
        """Every client scores the model it would run: its own width's slice of ``state`` (the
        full student when ``full_width``, or for a device too small for any width); with
        ``state`` None, the model it keeps."""
        content = Content(configs={"config": {"splits": ",".join(splits), "round": r}})
        by_width = {None: content} if state is None else self._contents_by_width(content, state)
        if state is not None and self.cfg.student_dim not in by_width:
            by_width.update(self._contents_by_width(content, state, widths=[self.cfg.student_dim]))
        full = self.cfg.student_dim

        def width(n: Node):
            return None if state is None else full if full_width else (self.width_of[n.partition_id] or full)
        items = [(n, by_width[width(n)]) for n in nodes]
        replies, down, up, _ = self._exchange(grid, items, "evaluate", r)
        out = {}
        for split in splits:
            hr = ndcg = n = 0.0
            rows = []
            for node, rep in replies:
                m = unpack(rep.content).metrics["metrics"]
                h, g, c = m[f"{split}-hr-sum"], m[f"{split}-ndcg-sum"], m[f"{split}-count"]
                hr, ndcg, n = hr + h, ndcg + g, n + c
                rows.append({"partition_id": node.partition_id, "tier": self.tier_of[node.partition_id],
                             "width": width(node) or full, "count": int(c), "hr_sum": h, "ndcg_sum": g})
            out[split] = {"hr": hr / max(n, 1), "ndcg": ndcg / max(n, 1), "n": int(n), "rows": rows,
                          "bytes": down + up}
        return out


REQUIRED_METRICS = ("num-examples", "steps", "loss")
# Where a round's wall time goes (timing.csv): preparing the train messages (soft labels,
# encoding, planning), measuring and logging every message (audit, part of exchange), waiting
# for the clients (exchange), validating and decoding replies, aggregating, validation rounds;
# client_train_s sums the local training seconds the clients report (they run in parallel).
PROFILE_SECTIONS = ("targets_s", "prepare_s", "exchange_s", "audit_s", "accept_s", "aggregate_s", "validate_s",
                    "client_train_s")


def _reply_metrics(got: Content) -> dict:
    """The metrics a train reply must carry, type- and range-checked (reason codes as for arrays)."""
    m = got.metrics.get("metrics")
    if m is None:
        raise PayloadError("missing-key", "reply lacks its metrics record ('metrics')")
    missing = [k for k in REQUIRED_METRICS if k not in m]
    if missing:
        raise PayloadError("missing-key", f"reply metrics lack {missing}")
    for k in REQUIRED_METRICS:
        if isinstance(m[k], bool) or not isinstance(m[k], (int, float)):
            raise PayloadError("malformed", f"metric '{k}' is {m[k]!r}, not a number")
    if not np.isfinite(m["loss"]) or not np.isfinite(m["num-examples"]):
        raise PayloadError("non-finite", f"reported loss {m['loss']!r} / num-examples {m['num-examples']!r}")
    if m["num-examples"] < 0 or float(m["steps"]) != int(m["steps"]):
        raise PayloadError("malformed", f"num-examples {m['num-examples']!r} and steps {m['steps']!r} must be "
                                        "counts >= 0")
    return {**m, "steps": int(m["steps"])}


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"


def _progress(cfg: ExperimentConfig):
    from tqdm.auto import tqdm
    return tqdm(total=cfg.num_rounds, desc=f"fedkd {cfg.experiment_name}", unit="round",
                disable=not cfg.progress, leave=True)
