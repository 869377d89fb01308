"""Bare in-process screening loop: a params-protocol fedkd round without Flower.

    python -m simulations.screen --data-path ../shared/data/ml-100k/u.data --rounds 60 \\
        --server-opt fedadam --server-param eta=0.01 --kd-weight 1 --tag fedadam-e0.01

For screening levers only (server optimizer, local lr and steps, distillation schedule,
temperature, teacher): every number that is reported as a result must come from a real
Flower run (``fedkd run``). What it mirrors of ``server/fedkd_server.py`` and
``clients/client_app.py`` (params protocol, homogeneous width, no faults, no DP):

* the population, the teacher (``fedkd.teacher.load_or_train`` with the run's teacher
  settings, cached), the proxy set and each round's proxy batch (``round_rows``) and the
  teacher's top-k soft labels on it, encoded and decoded at ``soft-label-bits`` like the wire;
* the global student sent down quantised at ``quant-bits`` (nearest rounding), as clients see it;
* uniform selection of ``clients-per-round`` clients with the server's seed stream; each
  client's step budget from its device tier (``tier-steps``), its dropout seed and data rng
  as in the ClientApp; ``fedkd.local.local_train`` with the same arguments;
* the update ``trained - received``, quantised with stochastic rounding and decoded
  (``--no-quant`` skips both quantisations); the example-weighted mean (``fedkd.aggregate.combine``);
* then, instead of ``apply_update(state, mean, server-lr)``, a server optimizer
  (``fedkd.server_opt``; ``fedavg`` with ``eta = server-lr`` is exactly the landed step).

Differences from a real run: no messages, byte counting, clock, deadlines or rejections;
validation every ``--eval-every`` rounds on the edge users directly (all of them, or a fixed
per-seed sample with ``--val-users``) instead of through evaluate messages; the test split
is scored once, for the round chosen on validation. The distillation weight may follow a
schedule over rounds (``--kd-schedule``), which the landed server does not have yet.

Writes a per-evaluation curve (CSV) and one summary line (JSONL) per run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.aggregate import combine
from fedkd.budget import StepBudget
from fedkd.codec import decode_state, decode_update, encode_state, encode_update, layout_of
from fedkd.config import ExperimentConfig
from fedkd.edge import client_data
from fedkd.fleet import distill
from fedkd.local import ProxyBatch, get_state, local_train, set_state
from fedkd.metrics import evaluate_ranking
from fedkd.models import build_model
from fedkd.population import population
from fedkd.proxy import build_proxy_set, decode_proxy, encode_proxy, round_rows, soft_labels
from fedkd.samples import eval_set, train_samples
from fedkd.schedule import select
from fedkd.server_opt import LR_SCHEDULES, lr_scale, make_server_optimizer
from fedkd.teacher import load_or_train
from simulations.cli import load_overrides

ROOT = Path(__file__).resolve().parents[1]
KD_SCHEDULES = ("constant", "linear", "exp", "gate")


def kd_weight_at(base: float, schedule: str, r: int, *, decay_rounds: int, decay: float, gated: bool) -> float:
    """Distillation weight of round ``r`` (from 1). linear: to 0 at ``decay_rounds``; exp:
    ``decay ** (r - 1)``; gate: constant until the student's validation passes the teacher's."""
    if base == 0:
        return 0.0
    if schedule == "linear":
        return base * max(0.0, 1.0 - (r - 1) / max(decay_rounds, 1))
    if schedule == "exp":
        return base * decay ** (r - 1)
    if schedule == "gate":
        return 0.0 if gated else base
    return base


def parse_params(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip().replace("-", "_")] = float(value)
    return out


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    overrides = {**load_overrides(args.config), "data-path": str(Path(args.data_path).resolve()) if args.data_path else "",
                 "cloud-fraction": args.cloud_fraction, "seed": args.seed,
                 "clients-per-round": args.clients_per_round, "num-rounds": max(args.rounds, 1),
                 "cache-dir": str(Path(args.cache_dir).resolve()), **dict(args.set or [])}
    cfg = ExperimentConfig.from_flat(overrides)
    pop = population(cfg)
    seqs, n_items = pop.dataset.sequences, pop.dataset.num_items
    cloud = pop.cloud_users
    edge = np.sort(np.concatenate(pop.clients))

    # --- the cloud: teacher and proxy set ---------------------------------------------
    tcfg = dataclasses.replace(cfg.teacher_train(), lr_schedule=args.teacher_schedule,
                               min_epochs=args.teacher_min_epochs)
    teacher, tinfo = load_or_train(cfg.teacher_model(n_items), tcfg, pop.dataset.fingerprint(),
                                   train_samples([seqs[u][:-2] for u in cloud], cfg.max_len),
                                   eval_set(seqs, cloud, "valid", cfg.max_len), cache_dir=Path(cfg.cache_dir),
                                   extra={"cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed})
    proxy = build_proxy_set(seqs, cloud, size=cfg.proxy_size, max_len=cfg.max_len, seed=cfg.seed)
    # --- evaluation sets: validation (all edge users or a fixed per-seed sample), test -----
    val_users = edge
    if args.val_users and args.val_users < len(edge):
        val_users = np.sort(np.random.default_rng([cfg.seed, 13]).choice(edge, size=args.val_users, replace=False))
    valid = eval_set(seqs, val_users, "valid", cfg.max_len)
    test = eval_set(seqs, edge, "test", cfg.max_len)
    t_val = evaluate_ranking(teacher, valid, k=cfg.eval_k).ndcg
    t_test = evaluate_ranking(teacher, test, k=cfg.eval_k).ndcg
    print(f"teacher (cloud best val {tinfo['best_valid_ndcg']:.4f}, epoch {tinfo['best_epoch']}): "
          f"edge val {t_val:.4f}, edge test {t_test:.4f}", flush=True)

    if args.rounds == 0:  # teacher screening only
        out = {"tag": args.tag, "rounds_run": 0, "cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed,
               "teacher_dropout": cfg.teacher_dropout, "teacher_weight_decay": cfg.teacher_weight_decay,
               "teacher_schedule": args.teacher_schedule, "teacher_min_epochs": args.teacher_min_epochs,
               "overrides": dict(args.set or []), "teacher_best_epoch": tinfo["best_epoch"],
               "teacher_epochs_run": tinfo.get("epochs_run"), "teacher_edge_val_ndcg10": t_val,
               "teacher_edge_test_ndcg10": t_test, "teacher_cloud_val_ndcg10": tinfo["best_valid_ndcg"],
               "wall_s": time.perf_counter() - t_start}
        print(json.dumps(out), flush=True)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        with (Path(args.out_dir) / "teachers.jsonl").open("a") as f:
            f.write(json.dumps(out) + "\n")
        return out

    # --- the fleet ---------------------------------------------------------------------
    full = cfg.student_model(n_items)
    model = build_model(full, seed=cfg.seed)
    state = get_state(model)
    layout = layout_of(state)
    pids = list(range(pop.num_clients))
    data = [client_data(cfg, p) for p in pids]
    steps_of = [cfg.tiers[d.tier][2] for d in data]
    opt = make_server_optimizer(args.server_opt, **parse_params(args.server_param or []))
    quant = not args.no_quant
    warm = {}
    if args.warm_start_steps:  # the server pre-trains the student before round 1 (cloud data only)
        t_w = time.perf_counter()
        sl = soft_labels(teacher, proxy, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
        private = train_samples([seqs[u][:-2] for u in cloud], cfg.max_len) if args.warm_start_private else None
        torch.manual_seed(cfg.seed)
        loss = distill(model, torch.optim.Adam(model.parameters(), lr=cfg.server_distill_lr),
                       ProxyBatch(proxy, sl.ids, sl.probs), steps=args.warm_start_steps,
                       kd_batch_size=cfg.kd_batch_size, temperature=cfg.kd_temperature,
                       rng=np.random.default_rng([cfg.seed, 21]), private=private)
        state = get_state(model)
        warm = {"warm_loss": loss, "warm_val_ndcg10": evaluate_ranking(model, valid, k=cfg.eval_k).ndcg,
                "warm_s": time.perf_counter() - t_w}
        print(f"warm start: {args.warm_start_steps} steps, loss {loss:.3f}, edge val {warm['warm_val_ndcg10']:.4f}, "
              f"{warm['warm_s']:.0f}s", flush=True)

    curve, best = [], (-1.0, 0, state)
    gated, target_round = False, None
    curve_path = Path(args.out_dir) / f"{args.tag}.csv"
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        kd_w = kd_weight_at(cfg.kd_weight, args.kd_schedule, r, decay_rounds=args.kd_decay_rounds,
                            decay=args.kd_decay, gated=gated)
        proxy_batch = None
        if kd_w > 0:
            rows = round_rows(len(proxy), round_idx=r, size=cfg.proxy_batch, seed=cfg.seed)
            sl = soft_labels(teacher, proxy[rows], temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
            proxy_batch = decode_proxy(encode_proxy(proxy[rows], sl, num_items=n_items, bits=cfg.soft_label_bits),
                                       rows=len(rows), top_k=cfg.kd_top_k, max_len=cfg.max_len,
                                       num_items=n_items, bits=cfg.soft_label_bits)
        start = (decode_state(encode_state(state, bits=cfg.student_bits, stochastic=False, per_row=cfg.per_row),
                              layout, bits=cfg.student_bits, per_row=cfg.per_row) if quant else state)
        chosen = select(pids, cfg.clients_per_round, rng=np.random.default_rng([cfg.seed, 8, r]),
                        policy="uniform", tier_of={}, finishes={})
        entries, losses = [], []
        for pid in chosen:
            d = data[pid]
            set_state(model, start)
            torch.manual_seed(hash((cfg.seed, 7, r, pid)) % 2**31)
            rng = np.random.default_rng([cfg.seed, 6, r, pid])
            res = local_train(model, d.train, proxy_batch, budget=StepBudget(steps_of[pid]),
                              batch_size=cfg.batch_size, kd_batch_size=cfg.kd_batch_size, lr=cfg.local_lr,
                              kd_weight=kd_w, temperature=cfg.kd_temperature, rng=rng,
                              optimizer=cfg.local_optimizer, clip_norm=cfg.local_clip_norm or None)
            trained = get_state(model)
            update = {k: trained[k] - start[k] for k in start}
            if quant:
                update = decode_update(encode_update(update, bits=cfg.quant_bits, stochastic=cfg.quant_stochastic,
                                                     rng=rng, per_row=cfg.per_row), layout,
                                       bits=cfg.quant_bits, per_row=cfg.per_row)
            entries.append((pid, cfg.student_dim, update, float(res.examples)))
            losses.append(res.mean_loss)
        mean_update, _ = combine(entries, full)
        # the landed server applies the update to its unquantised state; so do we
        scale = lr_scale(args.server_lr_schedule, r, num_rounds=args.rounds, final=args.server_lr_final)
        state = opt.step(state, mean_update, server_round=r, scale=scale)
        row = {"round": r, "kd_weight": kd_w, "train_loss": float(np.nanmean(losses)),
               "round_s": time.perf_counter() - t0}
        if r % args.eval_every == 0 or r == args.rounds:
            set_state(model, state)
            ev = evaluate_ranking(model, valid, k=cfg.eval_k)
            row.update(val_ndcg=ev.ndcg, val_hr=ev.hr)
            if args.trace_test:  # diagnostic only: selection stays on validation
                row["test_ndcg_trace"] = evaluate_ranking(model, test, k=cfg.eval_k).ndcg
            if ev.ndcg > best[0]:
                best = (ev.ndcg, r, {k: v.copy() for k, v in state.items()})
            if args.kd_schedule == "gate" and not gated and ev.ndcg > t_val:
                gated = True
                print(f"round {r}: student val {ev.ndcg:.4f} passed the teacher's {t_val:.4f}; KD off", flush=True)
            if args.target and target_round is None and ev.ndcg >= args.target:
                target_round = r
            print(f"round {r}: val NDCG@10 {ev.ndcg:.4f} (best {best[0]:.4f} @ {best[1]}), kd {kd_w:.3g}, "
                  f"loss {row['train_loss']:.3f}, {row['round_s']:.1f}s, total {time.perf_counter() - t_start:.0f}s",
                  flush=True)
        curve.append(row)
        with curve_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["round", "kd_weight", "train_loss", "round_s", "val_ndcg", "val_hr",
                                                  "test_ndcg_trace"])
            w.writeheader()
            w.writerows(curve)
        if not np.all([np.isfinite(v).all() for v in state.values()]):
            print("non-finite state: stopping", flush=True)
            break
        if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"time cap of {args.max_minutes} minutes reached after round {r}", flush=True)
            break
    set_state(model, best[2])
    te = evaluate_ranking(model, test, k=cfg.eval_k)
    vals = [c["val_ndcg"] for c in curve if "val_ndcg" in c]
    out = {"tag": args.tag, "argv": args.argv, "server_opt": opt.name, "server_params": opt.params,
           "server_lr_schedule": args.server_lr_schedule, "server_lr_final": args.server_lr_final, "rounds_run": curve[-1]["round"],
           "cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed, "clients_per_round": cfg.clients_per_round,
           "local_lr": cfg.local_lr, "tier_steps": cfg.tier_steps, "kd_weight": cfg.kd_weight,
           "kd_schedule": args.kd_schedule, "kd_temperature": cfg.kd_temperature,
           "teacher_dropout": cfg.teacher_dropout, "teacher_weight_decay": cfg.teacher_weight_decay,
           "student_dropout": cfg.student_dropout, "quant": quant, "overrides": dict(args.set or []),
           "best_val_ndcg10": best[0], "best_round": best[1], "test_ndcg10": te.ndcg, "test_hr10": te.hr,
           "last_val_ndcg10": vals[-1] if vals else None,
           "mean_val_last3": float(np.mean(vals[-3:])) if vals else None,
           "target": args.target, "target_round": target_round,
           "teacher_edge_val_ndcg10": t_val, "teacher_edge_test_ndcg10": t_test,
           "teacher_cloud_val_ndcg10": tinfo["best_valid_ndcg"], "val_users": int(len(val_users)),
           "warm_start_steps": args.warm_start_steps, "warm_start_private": args.warm_start_private, **warm,
           "wall_s": time.perf_counter() - t_start}
    print(json.dumps(out), flush=True)
    with (Path(args.out_dir) / "screen.jsonl").open("a") as f:
        f.write(json.dumps(out) + "\n")
    return out


def _kv(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="Interaction file ('' = the synthetic generator).")
    p.add_argument("--config", type=Path, action="append", default=[ROOT / "simulations" / "ml100k.toml"],
                   help="TOML overrides (default: simulations/ml100k.toml).")
    p.add_argument("--set", type=_kv, action="append", metavar="KEY=VALUE",
                   help="Any fedkd config override, e.g. --set local-lr=2 --set kd-temperature=4.")
    p.add_argument("--cloud-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=60, help="0 = train/load the teacher and score it only.")
    p.add_argument("--clients-per-round", type=int, default=150)
    p.add_argument("--server-opt", default="fedavg", help="fedavg | fedavgm | fedadam | fedyogi | fedadagrad")
    p.add_argument("--server-param", action="append", metavar="NAME=VALUE",
                   help="Server optimizer parameter (Flower's names: eta, beta_1, beta_2, tau, "
                        "server_learning_rate, server_momentum).")
    p.add_argument("--server-lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="Factor on the server step over --rounds (fedkd.server_opt.lr_scale).")
    p.add_argument("--server-lr-final", type=float, default=0.1, help="The schedule's final factor.")
    p.add_argument("--warm-start-steps", type=int, default=0,
                   help="Before round 1 the server distils the teacher into the student on the proxy set.")
    p.add_argument("--warm-start-private", action="store_true",
                   help="The warm start also fits the cloud users' own training samples (CE).")
    p.add_argument("--kd-schedule", choices=KD_SCHEDULES, default="constant")
    p.add_argument("--kd-decay-rounds", type=int, default=50)
    p.add_argument("--kd-decay", type=float, default=0.97)
    p.add_argument("--teacher-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--teacher-min-epochs", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--val-users", type=int, default=0, help="Validate on a fixed per-seed sample (0 = all).")
    p.add_argument("--target", type=float, default=0.0, help="Record the first round validation reaches this.")
    p.add_argument("--trace-test", action="store_true",
                   help="Also score test at every evaluation, into the curve only (diagnostic; not for selection).")
    p.add_argument("--no-quant", action="store_true", help="Skip quantisation of the student and the updates.")
    p.add_argument("--max-minutes", type=float, default=14.0, help="Stop after this many minutes (0 = none).")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "fedkd"))
    p.add_argument("--out-dir", default=str(ROOT / "outputs" / "screen"))
    p.add_argument("--tag", default="run")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.argv = " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
