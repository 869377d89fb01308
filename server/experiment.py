"""One fedkd experiment on a Grid: parts composed once from the config, then one round loop.

The loop reads like Flower's ``Strategy.start``: for each round, the protocol prepares what
goes down, the fleet plans and samples who trains, the transport exchanges messages, replies
are checked, the protocol absorbs the accepted uploads (aggregator, server step, privacy
budget, teacher refinement), then validation, the metrics row and the checkpoint. Each part
is a small object in its own module with ``state_dict`` / ``load_state_dict`` where it carries
state across rounds, so a checkpoint is ``{name: part.state_dict()}`` (docs/architecture.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.serverapp import Grid

from fedkd import checkpoint
from fedkd.codec import REASONS
from fedkd.config import ExperimentConfig
from fedkd.models import num_parameters
from fedkd.plots import plot_run
from fedkd.population import population
from fedkd.results import CsvLog, read_metrics, save_student, state_digest, write_json
from fedkd.simtime import round_wall_seconds
from server.compose import compose
from server.fleet import with_steps
from server.protocols.base import contents_by_width
from server.replies import accept
from server.transport import Profile, Transport

log = logging.getLogger("fedkd")
# Results files the round loop appends to; a checkpoint records their lengths, and a resume
# cuts them back to those lengths. The files the end of a run writes are rewritten.
APPENDED = ("metrics.csv", "timing.csv", "rejections.jsonl", "wire.jsonl")
REWRITTEN = ("test_per_client*.csv", "summary.json", "student.pt", "student.json", "*.png")


class Experiment:
    """Runs one experiment on a Grid and writes its results folder."""

    def __init__(self, cfg: ExperimentConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.metrics, self.timing = CsvLog(out / "metrics.csv"), CsvLog(out / "timing.csv")
        self.profile = Profile()
        self.transport = Transport(out, round_timeout=cfg.round_timeout, wire_payloads=cfg.wire_payloads,
                                   profile=self.profile, handshake_timeout=cfg.handshake_timeout,
                                   poll=cfg.reply_poll_interval, window=cfg.exchange_window,
                                   handshake_verify=cfg.handshake_verify, seed=cfg.seed)
        self.cum_bytes, self.extra_tests, self.wall_before = 0, {}, 0.0
        self.rounds_run, self.stopped = 0, ""

    def run(self, grid: Grid) -> dict:
        """Every round (after the checkpointed ones with ``resume``), then the test and the summary."""
        cfg = self.cfg
        self.t_start = time.perf_counter()
        compose(self, grid)
        first = self.restore() + 1 if cfg.resume else 1
        t_rounds = time.perf_counter() - self.wall_before
        bar = _progress(cfg, first - 1)
        self.rounds_run = first - 1
        with _log_above(bar):
            self.rounds(grid, first, t_rounds, bar)
        bar.close()
        return self.finish(grid)

    def rounds(self, grid: Grid, first: int, t_rounds: float, bar) -> None:
        """Rounds ``first`` .. ``num-rounds`` (or to a stop), each ending with its rows, checkpoint and log line."""
        cfg = self.cfg
        for r in range(first, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            if self.privacy is not None and self.privacy.refuses(r):
                self.stopped = "privacy budget"
                break
            row = self.train_round(grid, r)
            self.cum_bytes += row["bytes_down"] + row["bytes_up"]
            row["cum_bytes"] = self.cum_bytes
            row.update(self.transport.traffic.close_round())
            row.update(self.validate_round(grid, r))
            ev = self.evaluator
            if ev.target is not None and "bytes" not in ev.target:  # time to accuracy
                ev.target.update(bytes=self.cum_bytes, sim_time_s=self.fleet.sim_time)
            row["model_digest"] = state_digest(self.protocol.state)
            self.metrics.append(row)  # a pure function of config and seed; wall times go to timing.csv
            timing = {"round": r, "round_s": time.perf_counter() - t0, "wall_s": time.perf_counter() - t_rounds,
                      **self.profile.close_round()}
            self.timing.append(timing)
            self.checkpoint(r, timing["wall_s"])
            bar.update(1)
            log.info("round %d/%d: val NDCG@%d %s, %d/%d aggregated, %d rejected, %.0f kB down %.0f kB up, %.1fs",
                     r, cfg.num_rounds, cfg.eval_k, _fmt(row["val_ndcg"]), row["aggregated"], row["participants"],
                     row["rejected"], row["bytes_down"] / 1e3, row["bytes_up"] / 1e3, timing["round_s"])
            self.rounds_run = r
            if ev.plateaued or (cfg.stop_at_target and ev.target is not None):
                self.stopped = "plateau" if ev.plateaued else "target"
                log.info("%s stop after round %d: %s", self.stopped, r,
                         f"{cfg.stop_patience} validations without a better model" if ev.plateaued
                         else f"validation NDCG@{cfg.eval_k} reached {cfg.target_ndcg}")
                break

    def train_round(self, grid: Grid, r: int) -> dict:
        """One round of training under the configured protocol; returns its metrics row so far."""
        cfg, proto, fleet, transport = self.cfg, self.protocol, self.fleet, self.transport
        if not proto.clients_train:
            return self.server_round_row(r, proto.server_round(r))
        t_prepare = time.perf_counter()
        rows = self.cloud.batch_rows(r)
        batch = self.cloud.proxy[rows] if rows is not None else None
        with self.profile.timed("targets_s"):
            targets = proto.targets(batch, r)
        by_width = contents_by_width(proto.content(r, rows, targets), proto.state, fleet.widths,
                                     full_model=fleet.full_model, cfg=cfg)
        online = fleet.online(r)
        plans = fleet.plan(online, by_width, transport)
        online = [n for n in online if self.privacy is None or self.privacy.may_train(n.partition_id)]
        chosen = self.sampler([n.partition_id for n in online], plans, r)
        selected = [n for n in online if n.partition_id in chosen]
        sent, keys = [n for n in selected if plans[n.partition_id].used], (0, 0)
        if self.before_train is not None:  # secure aggregation's key exchange: who fails here gets no work
            sent, keys = self.before_train(grid, sent, by_width.values(), r)
        message = {n.partition_id: proto.for_node(n, by_width[fleet.width_of[n.partition_id]]) for n in selected}
        items = [(n, with_steps(message[n.partition_id], plans[n.partition_id].steps)) for n in sent]
        self.profile.spent["prepare_s"] += time.perf_counter() - t_prepare
        ex = transport.exchange(grid, items, "train", r)
        dropped = sum(transport.nbytes(message[n.partition_id], count=True) for n in selected if n not in sent)
        down, up = ex.down + keys[0] + dropped, ex.up + keys[1]  # a device sent nothing still downloads
        replied = [n.partition_id for n, _ in ex.replies]
        proto.delivered(sent, set(replied))
        timings, late = fleet.clock(selected, plans, ex.sizes, set(replied))
        replies = [(n, rep) for n, rep in ex.replies if n.partition_id not in late]
        with self.profile.timed("accept_s"):
            uploads, rejected = accept(replies, r, decode=proto.decode, sizes=ex.sizes, transport=transport,
                                       allowed={n.partition_id: plans[n.partition_id].steps for n in sent},
                                       max_reply_bytes=cfg.max_reply_bytes,
                                       norm_reject=cfg.norm_reject if proto.name == "params" else 0.0)
        self.profile.spent["client_train_s"] += sum(float(u.metrics.get("train-seconds", 0.0)) for u in uploads)
        seen = uploads  # what the server saw, whether or not the round counts (for the observers)
        rejected.update(ex.failed)
        skipped = len(uploads) < cfg.min_replies
        if skipped:
            log.warning("round %d skipped: %d valid train replies, min-replies is %d; the model is unchanged "
                        "(%d rejected: %s)", r, len(uploads), cfg.min_replies, len(rejected),
                        ", ".join(f"{c} x{list(rejected.values()).count(c)}" for c in sorted(set(rejected.values())))
                        or "none")
            uploads = []
        with self.profile.timed("aggregate_s"):
            extra = proto.absorb(uploads, r, batch=batch, released=replied)
        for observer in self.observers.values():  # after the aggregator: secure aggregation's sum exists now
            observer.observe(seen, r)
        more_down, more_up = extra.pop("aggregator_bytes", (0, 0))  # secure aggregation's unmask step
        down, up = down + more_down, up + more_up
        if extra.pop("aggregated", len(uploads)) == 0 and uploads:  # void or refused: nothing went in
            skipped, uploads = True, []
        fleet.trained.update(u.node.partition_id for u in uploads)
        round_s = round_wall_seconds(timings.values(), cfg.round_deadline)
        fleet.sim_time += round_s
        aggregated = [u.node.partition_id for u in uploads]
        stragglers = {n.partition_id for n in selected} - set(aggregated) - {n.partition_id for n, _ in replies} \
            - set(ex.failed)  # dropped by the deadline, or late
        row = {"round": r, "online": len(online), "participants": len(selected), "replied": len(replies),
               "stragglers": len(stragglers), "rejected": len(rejected), "aggregated": len(uploads),
               "skipped": int(skipped), "norm_bounded": extra.pop("norm_bounded"),
               "train_loss": _mean(float(u.metrics["loss"]) for u in uploads), "bytes_down": down, "bytes_up": up,
               "sim_round_s": round_s, "sim_time_s": fleet.sim_time,
               **{f"rejected_{code}": list(rejected.values()).count(code) for code in REASONS}, **extra}
        steps: dict[int, list[int]] = {}
        for u in uploads:
            steps.setdefault(fleet.tier_of[u.node.partition_id], []).append(int(u.metrics["steps"]))
        per_tier = {"participants": [n.partition_id for n in selected], "stragglers": sorted(stragglers),
                    "aggregated": aggregated}
        return {**row, **fleet.tier_columns(steps, per_tier)}

    def server_round_row(self, r: int, loss: float) -> dict:
        """The row of a round in which no client trained (``proxy`` protocol)."""
        row = {"round": r, "online": 0, "participants": 0, "replied": 0, "stragglers": 0, "rejected": 0,
               "aggregated": 0, "skipped": 0, "norm_bounded": 0, "train_loss": loss, "bytes_down": 0,
               "bytes_up": 0, "sim_round_s": 0.0, "sim_time_s": self.fleet.sim_time,
               **{f"rejected_{code}": 0 for code in REASONS}}
        return {**row, **self.fleet.tier_columns({})}

    def validate_round(self, grid: Grid, r: int) -> dict:
        """Validation columns (every eval-every rounds, the last, and test-rounds), and the extra tests."""
        cfg, row = self.cfg, {"val_hr": "", "val_ndcg": "", "eval_bytes": 0}
        validated = r % cfg.eval_every == 0 or r == cfg.num_rounds or r in cfg.extra_test_rounds
        if validated:
            with self.profile.timed("validate_s"):
                ev = self.evaluator.validate(grid, self.protocol.state, r)
            row.update(val_hr=ev["hr"], val_ndcg=ev["ndcg"], eval_bytes=ev["bytes"])
        if cfg.val_smoothing > 1:
            row["val_ndcg_smoothed"] = ev["smoothed"] if validated else ""
        row.update(self.kd.observe(r, self.protocol.state if validated else None))
        if self.cloud.refines:
            row["teacher_cloud_val_ndcg"] = self.cloud.teacher_score() if row["val_ndcg"] != "" else ""
        if r in cfg.extra_test_rounds and r != cfg.num_rounds:
            t = self.evaluator.test(grid, f"test_per_client_r{r}.csv")
            self.extra_tests[r] = {"best_round": self.evaluator.best[1], "hr": t["hr"], "ndcg": t["ndcg"],
                                   "train_bytes": self.cum_bytes}
        return row

    def finish(self, grid: Grid) -> dict:
        """Test the chosen model, write the summary, the chosen student and the plots."""
        cfg, ev, k = self.cfg, self.evaluator, self.cfg.eval_k
        stop = self.privacy.stop if self.privacy is not None else None
        if stop and stop["rounds_trained"] > ev.best[1]:  # the last model the budget allowed
            res = ev.validate(grid, self.protocol.state, stop["rounds_trained"])
            log.info("privacy stop: model of round %d, val NDCG@%d %.4f", stop["rounds_trained"], k, res["ndcg"])
        t_test = time.perf_counter()
        test = ev.test(grid, "test_per_client.csv")
        test_s = time.perf_counter() - t_test  # through every client: what grows with the fleet (performance.md)
        rows = read_metrics(self.out / "metrics.csv") if (self.out / "metrics.csv").exists() else []
        best_val, best_round, best_state = ev.best
        summary = {
            "experiment": cfg.experiment_name, "protocol": cfg.protocol, "clients": len(self.fleet.nodes),
            "clients_trained": len(self.fleet.trained), "rounds": cfg.num_rounds,
            "rounds_run": self.rounds_run, "stopped": self.stopped or "last round",
            "student_parameters": num_parameters(self.student), "best_round": best_round, "best_val_ndcg": best_val,
            f"test_hr@{k}": test["hr"], f"test_ndcg@{k}": test["ndcg"], "test_users": test["n"],
            "train_bytes_total": self.cum_bytes, "train_bytes_per_round": self.cum_bytes / max(self.rounds_run, 1),
            "bytes_down_total": int(sum(r["bytes_down"] for r in rows)),
            "bytes_up_total": int(sum(r["bytes_up"] for r in rows)),
            "stragglers_total": int(sum(r["stragglers"] for r in rows)),
            "rejected_total": int(sum(r["rejected"] for r in rows)),
            "nodes_refused": len(self.transport.refused),  # at the handshake (rejections.jsonl, round 0)
            "tests_at_rounds": self.extra_tests, "teacher": self.cloud.teacher_info,
            **ev.tier_summary(grid, test, rows), **(self.privacy.summary() if self.privacy is not None else {}),
            "wall_seconds": time.perf_counter() - self.t_start, "startup": self.startup, "test_s": test_s,
            **({"warm_start": self.warm_start} if self.warm_start is not None else {}),
            "data": population(cfg).dataset.stats.as_dict(),  # what loading found and dropped
        }
        if self.cloud.refines:
            summary["teacher_cloud_val_ndcg_final"] = self.cloud.teacher_score()
        if cfg.target_ndcg:  # time to accuracy (None: never reached)
            summary["target"] = {"val_ndcg": cfg.target_ndcg, **(ev.target or {"round": None})}
        if self.kd.gated_at is not None:
            summary["kd_gated_after_round"] = self.kd.gated_at
        summary.update(self.test_model(best_round, best_state))
        if best_state is not None:  # the chosen global student, for `fedkd export` and later analysis
            save_student(self.out, best_state, self.fleet.full_model)
        for step in self.end_of_run:  # measurements on the finished run (membership, reconstruction attacks)
            summary.update(step(best_state))
        write_json(self.out / "summary.json", summary)
        plot_run(rows, self.out, k=k, title=cfg.experiment_name,
                 references={name: ref["val_ndcg"] for name, ref in summary.get("references", {}).items()})
        log.info("test HR@%d %.4f NDCG@%d %.4f (model of round %d); results in %s", k, test["hr"], k, test["ndcg"],
                 best_round, self.out)
        return summary

    def test_model(self, best_round: int, best_state) -> dict:
        """What ``test_hr@k`` / ``test_ndcg@k`` score, in words, and the saved float32 student's own
        scores (``test_*_float32``): the devices score the student as they receive it
        (``down-bits``, 8 by default), while ``student.pt`` and ``fedkd export`` are float32."""
        cfg, k, fleet = self.cfg, self.cfg.eval_k, self.fleet
        if best_state is None:
            return {"test_model": f"each device's own model at round {best_round} (protocol {cfg.protocol}: the "
                                  "models stay on the devices), scored on the devices"}
        mixed = any(fleet.width_of[n.partition_id] != cfg.student_dim for n in fleet.nodes)
        saved = self.evaluator.saved_test(best_state)
        return {"test_model": f"the global student of round {best_round} as the devices received it "
                              f"({cfg.student_bits}-bit{', each device its width' if mixed else ''}), scored on "
                              "the devices",
                "test_model_float32": "the same student as saved in student.pt (float32, full width: what "
                                      "`fedkd export` ships), scored by the server on the same users' test items",
                f"test_hr@{k}_float32": saved["hr"], f"test_ndcg@{k}_float32": saved["ndcg"]}

    # ------------------------------------------------------------------ checkpoints
    def parts(self) -> dict:
        """Every part that carries state from one round to the next, by name."""
        named = {"transport": self.transport, "fleet": self.fleet, "protocol": self.protocol, "kd": self.kd,
                 "evaluator": self.evaluator, "cloud": self.cloud, "privacy": self.privacy, **self.observers}
        return {name: part for name, part in named.items() if part is not None}

    def checkpoint(self, r: int, wall_s: float) -> None:
        """Everything the next round needs, written atomically once round ``r`` is in the results."""
        checkpoint.save(self.out, {
            "round": r, "config": self.cfg.to_flat(), "wall_s": wall_s, "cum_bytes": self.cum_bytes,
            "extra_tests": self.extra_tests, "parts": {name: p.state_dict() for name, p in self.parts().items()},
            "files": checkpoint.file_sizes(self.out, APPENDED + tuple(
                p.name for p in sorted(self.out.glob("test_per_client_r*.csv"))))})

    def restore(self) -> int:
        """Load the last checkpoint into the parts, cut the results files back to it; returns its round."""
        ck = checkpoint.load(self.out, self.cfg.to_flat())
        checkpoint.truncate(self.out, ck["files"], REWRITTEN)
        self.metrics, self.timing = CsvLog(self.out / "metrics.csv"), CsvLog(self.out / "timing.csv")
        for name, part in self.parts().items():
            part.load_state_dict(ck["parts"][name])
        self.cum_bytes, self.extra_tests, self.wall_before = ck["cum_bytes"], ck["extra_tests"], ck["wall_s"]
        checkpoint.set_rng_states(ck["rng"])
        log.info("resumed after round %d of %d from %s", ck["round"], self.cfg.num_rounds, self.out / checkpoint.NAME)
        return ck["round"]


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"


def _progress(cfg: ExperimentConfig, done: int):
    """The rounds' progress bar: only with ``progress`` on *and* stderr a terminal.

    ``disable=None`` is tqdm's "off when not a TTY": under `flwr run` or a deployment (whose
    ServerApp's stderr is a log file or a pipe) a bar redrawn with carriage returns would garble
    the log, whatever ``progress`` says.
    """
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.num_rounds, desc=f"fedkd {cfg.experiment_name}", unit="round",
               disable=None if cfg.progress else True, leave=True)
    bar.update(done)
    return bar


def _log_above(bar):
    """While the bar is shown, fedkd's log lines to the terminal go through ``tqdm.write``: the bar
    is cleared, the line printed, the bar redrawn below it, so a log line never continues the
    bar's line. run.log (a file handler) is left as it is."""
    import contextlib

    if bar.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm(loggers=[log], tqdm_class=type(bar))
