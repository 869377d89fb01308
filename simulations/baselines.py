"""The baseline table: popularity, centralized teacher and student, FedAvg student, fedkd student.

    python -m simulations.baselines --data-path ../shared/data/ml-100k/u.data --seeds 0 1

Every row is scored on the same users (the edge users of that cloud fraction and seed),
on their test item, with full ranking and the user's history masked. The two federated
rows are real Flower simulations (``fedkd run`` in a subprocess each). fedkd is compared
with FedAvg at equal rounds and at equal bytes (FedAvg given as many extra rounds as
fedkd's soft labels cost), with a paired bootstrap interval over test users. The tables go
into the ``<!-- baselines -->`` block of ``--out`` (docs/results.md); the rest of the page stays.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.config import ExperimentConfig
from fedkd.metrics import evaluate_ranking, score_ranking
from fedkd.models import build_model, num_parameters
from fedkd.popularity import popularity_scorer
from fedkd.population import population
from fedkd.samples import eval_set, train_samples
from fedkd.stats import paired_bootstrap
from fedkd.teacher import load_or_train
from fedkd.train import TrainConfig, train_central
from simulations import ROOT
from simulations.cli import load_overrides
from simulations.docsplice import splice
from simulations.runner import overrides_toml
from simulations.runs import load_run

SECTION = "baselines"  # the block of --out this table fills (simulations/docsplice.py)


def central_rows(cfg: ExperimentConfig, student_epochs: int, student_seconds: float) -> list[dict]:
    """Popularity, teacher and centrally trained student, scored on the edge users' test items."""
    pop = population(cfg)
    seqs, n_items = pop.dataset.sequences, pop.dataset.num_items
    edge = np.sort(np.concatenate(pop.clients))
    test = eval_set(seqs, edge, "test", cfg.max_len)
    rows = []
    pop_res = score_ranking(popularity_scorer([s[:-2] for s in seqs], n_items), test, k=cfg.eval_k)
    rows.append(_row("popularity (all users' training items)", pop_res, params=0))
    cloud = pop.cloud_users
    teacher, info = load_or_train(
        cfg.teacher_model(n_items), cfg.teacher_train(), pop.dataset.fingerprint(),
        train_samples([seqs[u][:-2] for u in cloud], cfg.max_len), eval_set(seqs, cloud, "valid", cfg.max_len),
        cache_dir=Path(cfg.cache_dir), extra={"cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed})
    rows.append(_row(f"centralized teacher (cloud users, width {cfg.teacher_dim})",
                     evaluate_ranking(teacher, test, k=cfg.eval_k), params=num_parameters(teacher)))
    student = build_model(cfg.student_model(n_items), seed=cfg.seed)
    train_central(student, train_samples([seqs[u][:-2] for u in edge], cfg.max_len),
                  eval_set(seqs, edge, "valid", cfg.max_len),
                  TrainConfig(epochs=student_epochs, batch_size=128, lr=1e-3, patience=3, seed=cfg.seed,
                              max_seconds=student_seconds or None))
    rows.append(_row(f"centralized student (edge users pooled, width {cfg.student_dim})",
                     evaluate_ranking(student, test, k=cfg.eval_k), params=num_parameters(student)))
    return rows


def _row(name: str, res, *, params: int, **extra) -> dict:
    return {"model": name, "hr": res.hr, "ndcg": res.ndcg, "users": res.n, "params": params, **extra}


def federated(overrides: dict, name: str, work: Path, *, rounds: int | None = None) -> Path:
    """One `fedkd run` in a subprocess (Ray starts and stops cleanly per run); reuse a finished run."""
    out = work / name
    run = load_run(out)
    if run.finished and (rounds is None or run.summary["rounds"] == rounds):
        return out
    cfg_file = work / f"{name}.toml"
    ov = {**overrides, "experiment-name": name, "output-dir": str(work), "progress": False}
    if rounds is not None:
        ov["num-rounds"] = rounds
    cfg_file.write_text(overrides_toml(ov))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "simulations.cli", "run", "--config", str(cfg_file)],
                   cwd=ROOT, check=True)
    print(f"[baselines] {name}: {time.time() - t0:.0f}s", flush=True)
    return out


def _fedavg_bytes_per_round(kd_summary: dict, kd_dir: Path) -> float:
    """Training bytes per round without soft labels: fedkd's, minus the proxy payload.

    Measured, not guessed: wire.jsonl has the bytes of each exchange, and the proxy batch is
    the only part of a train message that FedAvg does not send. We take the smallest
    per-round total of a FedAvg-shaped message from a 1-round probe run instead of
    modelling Flower's framing.
    """
    del kd_summary
    probe = federated({**_read_overrides(kd_dir), "kd-weight": 0.0}, kd_dir.name + "-probe",
                      kd_dir.parent, rounds=1)
    return load_run(probe).summary["train_bytes_per_round"]


def _read_overrides(run_dir: Path) -> dict:
    import tomllib
    ov = tomllib.loads((run_dir.parent / f"{run_dir.name}.toml").read_text())
    return {k: v for k, v in ov.items() if k not in ("experiment-name", "output-dir", "progress", "num-rounds")}


def fed_row(name: str, out: Path, k: int) -> dict:
    s = load_run(out).summary
    return {"model": name, "hr": s[f"test_hr@{k}"], "ndcg": s[f"test_ndcg@{k}"], "users": s["test_users"],
            "params": s["student_parameters"], "rounds": s["rounds"], "mb": s["train_bytes_total"] / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="MovieLens-100K u.data (or any supported file).")
    p.add_argument("--config", type=Path, action="append", default=[ROOT / "simulations" / "ml100k.toml"],
                   help="TOML overrides for every run (default: simulations/ml100k.toml).")
    p.add_argument("--cloud-fractions", type=float, nargs="+", default=[0.2, 0.5], help="Cloud-user shares.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Experiment seeds.")
    p.add_argument("--student-epochs", type=int, default=40, help="Max epochs of the centralized student.")
    p.add_argument("--student-seconds", type=float, default=240,
                   help="Wall-clock cap on the centralized student's training (0 = none).")
    p.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "baselines",
                   help="Where the federated runs' folders go (finished runs are reused).")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md",
                   help="Markdown file whose baselines block gets the tables.")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    base = {**load_overrides(args.config), "data-path": str(Path(args.data_path).resolve())}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    table, comparisons = [], []
    for seed in args.seeds:  # seeds outermost: an interrupted table still covers every split
        for cf in args.cloud_fractions:
            ov = {**base, "cloud-fraction": cf, "seed": seed, "cache-dir": str((ROOT / ".cache/fedkd").resolve())}
            cfg = ExperimentConfig.from_flat(ov)
            tag = f"cf{cf:g}-s{seed}"
            cached = args.work_dir / f"{tag}-central-e{args.student_epochs}-t{args.student_seconds:g}.json"
            if cached.exists():  # reuse, so that a rerun only computes what is missing
                rows = json.loads(cached.read_text())
            else:
                rows = central_rows(cfg, args.student_epochs, args.student_seconds)
                cached.write_text(json.dumps(rows, indent=2))
            kd = federated(ov, f"{tag}-fedkd", args.work_dir)
            kd_s = load_run(kd).summary
            # FedAvg sends no soft labels, so equal bytes buys it extra rounds. One longer run
            # serves both comparisons: it is also tested after fedkd's number of rounds.
            per_round = _fedavg_bytes_per_round(kd_s, kd)
            eq_rounds = max(cfg.num_rounds, math.floor(kd_s["train_bytes_total"] / per_round))
            extra = {"test-rounds": str(cfg.num_rounds)} if eq_rounds > cfg.num_rounds else {}
            avg = federated({**ov, "kd-weight": 0.0, **extra}, f"{tag}-fedavg", args.work_dir, rounds=eq_rounds)
            avg_s = load_run(avg).summary
            eq_r = avg_s["tests_at_rounds"].get(str(cfg.num_rounds))
            rows.append({"model": "federated student, no distillation (FedAvg), equal rounds",
                         "hr": eq_r["hr"] if eq_r else avg_s[f"test_hr@{cfg.eval_k}"],
                         "ndcg": eq_r["ndcg"] if eq_r else avg_s[f"test_ndcg@{cfg.eval_k}"],
                         "users": avg_s["test_users"], "params": avg_s["student_parameters"],
                         "rounds": cfg.num_rounds,
                         "mb": (eq_r["train_bytes"] if eq_r else avg_s["train_bytes_total"]) / 1e6})
            rows += [fed_row(f"federated student, no distillation (FedAvg), equal bytes ({eq_rounds} rounds)",
                             avg, cfg.eval_k),
                     fed_row(f"fedkd student (lambda {cfg.kd_weight:g}, T {cfg.kd_temperature:g})", kd, cfg.eval_k)]
            for r in rows:
                table.append({"cloud": cf, "seed": seed, **r})
            eq_file = f"test_per_client_r{cfg.num_rounds}.csv" if eq_r else "test_per_client.csv"
            a, b, c = load_run(kd).user_ndcg(), load_run(avg).user_ndcg(eq_file), load_run(avg).user_ndcg()
            comparisons.append({"cloud": cf, "seed": seed, "kd": [a[i] for i in sorted(a)],
                                "avg": [b[i] for i in sorted(a)], "avg_eq": [c[i] for i in sorted(a)]})
            _write(args, table, comparisons, cfg.eval_k)
    return 0


def _write(args, table: list[dict], comparisons: list[dict], k: int) -> None:
    lines = [f"Command: `python -m simulations.baselines --data-path <ml-100k>/u.data "
             f"--cloud-fractions {' '.join(f'{c:g}' for c in args.cloud_fractions)} "
             f"--seeds {' '.join(map(str, args.seeds))}` (settings: `simulations/ml100k.toml`).", "",
             f"Test HR@{k} / NDCG@{k}, full ranking over all items, each user's earlier items masked, "
             "scored on the edge users of each split (the same users for every row). Federated rows: "
             "the model chosen on validation; MB = training traffic up + down, measured from the "
             "serialised Flower messages.", "",
             f"| cloud users | model | params | HR@{k} (mean ± sd over seeds) | NDCG@{k} (mean ± sd) | MB |",
             "|---|---|---|---|---|---|"]
    for cf in sorted({r["cloud"] for r in table}):
        for name in dict.fromkeys(r["model"] for r in table if r["cloud"] == cf):
            rs = [r for r in table if r["cloud"] == cf and r["model"] == name]
            mb = np.mean([r["mb"] for r in rs]) if "mb" in rs[0] else float("nan")
            lines.append(f"| {cf:.0%} | {name} | {rs[0]['params']:,} | {_ms([r['hr'] for r in rs])} | "
                         f"{_ms([r['ndcg'] for r in rs])} | {'' if math.isnan(mb) else f'{mb:.1f}'} |")
    lines += ["", f"### fedkd vs FedAvg: NDCG@{k} difference, paired bootstrap 95% interval over test users",
              "", "| cloud users | seeds | vs FedAvg, equal rounds | vs FedAvg, equal bytes |", "|---|---|---|---|"]
    for cf in sorted({c["cloud"] for c in comparisons}):
        cs = [c for c in comparisons if c["cloud"] == cf]
        strata = np.concatenate([[i] * len(c["kd"]) for i, c in enumerate(cs)])
        kd = np.concatenate([c["kd"] for c in cs])
        cells = []
        for key in ("avg", "avg_eq"):
            other = np.concatenate([c[key] for c in cs])
            m, lo, hi = paired_bootstrap(kd, other, strata=strata)
            rel = m / max(other.mean(), 1e-12)
            cells.append(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}] ({rel:+.1%})")
        lines.append(f"| {cf:.0%} | {', '.join(str(c['seed']) for c in cs)} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    splice(args.out, SECTION, text, heading="## Baselines on MovieLens-100K")


def _ms(xs: list[float]) -> str:
    return f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.4f}"


if __name__ == "__main__":
    sys.exit(main())
