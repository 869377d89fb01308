"""The few lines a run ends with; the whole summary stays in ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path

MAX_LINES = 15


def summary_lines(out: Path) -> list[str]:
    """At most :data:`MAX_LINES` lines: test scores and the round chosen, bytes, time, privacy
    figures when DP was on, and the results folder."""
    s = json.loads((Path(out) / "summary.json").read_text())
    k = next((key.split("@", 1)[1] for key in s if key.startswith("test_ndcg@") and "_" not in key[10:]), "10")
    lines = [f"fedkd {s.get('experiment', Path(out).name)}: protocol {s.get('protocol', '?')}, "
             f"{s.get('clients', '?')} clients ({s.get('clients_trained', '?')} trained), {s.get('rounds', '?')} rounds"]
    if f"test_ndcg@{k}" in s:
        lines.append(f"test HR@{k} {_num(s.get(f'test_hr@{k}'))}, NDCG@{k} {_num(s[f'test_ndcg@{k}'])} on "
                     f"{s.get('test_users', '?')} users: the model of round {s.get('best_round', '?')} "
                     f"(best validation NDCG@{k} {_num(s.get('best_val_ndcg'))})")
    if "test_model" in s:  # which model that score is: the devices score the student as they receive it
        lines.append(f"that is {s['test_model']}")
    if f"test_ndcg@{k}_float32" in s:
        lines.append(f"student.pt as saved (float32, what `fedkd export` ships): HR@{k} "
                     f"{_num(s.get(f'test_hr@{k}_float32'))}, NDCG@{k} {_num(s[f'test_ndcg@{k}_float32'])}")
    if f"test_ndcg@{k}_full_width" in s:
        lines.append(f"test of the full-width student on every user: HR@{k} {_num(s.get(f'test_hr@{k}_full_width'))}, "
                     f"NDCG@{k} {_num(s[f'test_ndcg@{k}_full_width'])}")
    if "train_bytes_total" in s:
        lines.append(f"bytes: {_mb(s.get('bytes_down_total'))} down, {_mb(s.get('bytes_up_total'))} up; "
                     f"{_mb(s['train_bytes_total'])} of training traffic ({_mb(s.get('train_bytes_per_round'))} a round)")
    teacher = s.get("teacher") or {}
    taught = ("teacher from the cache" if teacher.get("cached") else
              f"teacher trained in {teacher['seconds']:.1f} s" if "seconds" in teacher else "no teacher")
    if "wall_seconds" in s:
        lines.append(f"time: {s['wall_seconds']:.1f} s wall ({taught}); simulated device time "
                     f"{_num(s.get('sim_time_s'), '.1f')} s")
    if "dp_epsilon" in s:
        p = s.get("privacy") or {}
        stop = p.get("stopped")
        lines.append(f"privacy: dp-mode {p.get('mode', '?')}, epsilon {_num(s['dp_epsilon'], '.4g')} at delta "
                     f"{p.get('delta', '?')}, noise multiplier {_num(p.get('noise_multiplier'), '.4g')}, "
                     f"sampling rate {_num(p.get('rate'), '.4g')}"
                     + (f"; stopped after round {stop.get('rounds_trained')} (budget)" if stop else ""))
    if "mia_auc" in s:
        lines.append(f"membership-inference attack AUC {_num(s['mia_auc'])} (0.5 = no better than a coin)")
    rec = s.get("reconstruction_attack") or {}
    if rec.get("units"):
        seen = {"round-sum": "round sums", "group-sum": "group sums"}.get(rec.get("observed"), "updates")
        lines.append(f"history reconstruction from {seen}: precision@|history| {_num(rec.get('precision@k'))} "
                     f"(popularity {_num(rec.get('popularity_precision@k'))}, "
                     f"chance {_num(rec.get('random_precision@k'))})")
    faults = [f"{s[key]} {name}" for key, name in (("rejected_total", "rejected replies"),
                                                  ("stragglers_total", "stragglers")) if s.get(key)]
    if faults:
        lines.append("reliability: " + ", ".join(faults) + " (rejections.jsonl, metrics.csv)")
    data = s.get("data") or {}
    if data.get("duplicates_dropped") or data.get("short_rows_dropped"):
        lines.append(f"data: {data.get('duplicates_dropped', 0)} exact duplicate rows dropped, "
                     f"{data.get('short_rows_dropped', 0)} rows of short users dropped")
    lines.append(f"results: {out} (everything in summary.json, metrics.csv, run.log)")
    return lines[:MAX_LINES]


def _num(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _mb(value) -> str:
    return f"{value / 1e6:.2f} MB" if isinstance(value, (int, float)) else "?"
