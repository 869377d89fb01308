"""The centralized reference: the width-16 student trained on the edge users' pooled data.

    python -m simulations.central_ref --data-path ../shared/data/ml-100k/u.data \\
        --dropout 0.3 --lr 1e-3 --epochs 100 --patience 10 --schedule cosine

Same users, splits and metric as every federated run (the edge users of the cloud fraction
and seed; full ranking, history masked; the epoch chosen on validation NDCG@10, test
reported for it), so it is the upper bound the federated students are measured against.
Prefix training with a last-position loss (every prefix of a training sequence is a sample,
``fedkd.samples.train_samples``), Adam, early stopping on validation. Writes one JSON line
per run to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.config import ExperimentConfig
from fedkd.metrics import evaluate_ranking
from fedkd.models import build_model, num_parameters
from fedkd.population import population
from fedkd.samples import eval_set, train_samples
from fedkd.train import TrainConfig, train_central

ROOT = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace) -> dict:
    cfg = ExperimentConfig.from_flat({"data-path": str(Path(args.data_path).resolve()), "max-len": args.max_len,
                                      "cloud-fraction": args.cloud_fraction, "seed": args.seed,
                                      "student-dropout": args.dropout, "student-dim": args.dim})
    pop = population(cfg)
    seqs = pop.dataset.sequences
    edge = np.sort(np.concatenate(pop.clients))
    train = train_samples([seqs[u][:-2] for u in edge], cfg.max_len)
    valid = eval_set(seqs, edge, "valid", cfg.max_len)
    test = eval_set(seqs, edge, "test", cfg.max_len)
    model = build_model(cfg.student_model(pop.dataset.num_items), seed=cfg.seed)
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                     patience=args.patience, seed=cfg.seed, max_seconds=args.max_seconds or None,
                     lr_schedule=args.schedule, warmup_epochs=args.warmup, min_epochs=args.min_epochs,
                     val_smoothing=args.val_smoothing)
    t0 = time.perf_counter()

    def progress(row: dict) -> None:
        t = evaluate_ranking(model, test, k=10).ndcg if args.trace_test else float("nan")
        print(f"epoch {row['epoch']:3d} loss {row['loss']:.4f} val {row['valid_ndcg']:.4f} "
              f"(test {t:.4f}) {time.perf_counter() - t0:.0f}s", flush=True)

    res = train_central(model, train, valid, tc, progress=progress)
    te = evaluate_ranking(model, test, k=10)
    out = {"cloud_fraction": args.cloud_fraction, "seed": args.seed, "dim": args.dim, "dropout": args.dropout,
           "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
           "schedule": args.schedule, "warmup": args.warmup, "epochs": args.epochs, "patience": args.patience,
           "min_epochs": args.min_epochs, "val_smoothing": args.val_smoothing, "max_len": args.max_len, "users": int(len(edge)),
           "train_samples": int(len(train[1])), "params": num_parameters(model), "best_epoch": res.best_epoch,
           "epochs_run": res.epochs_run, "val_ndcg10": res.best_valid_ndcg, "test_ndcg10": te.ndcg,
           "test_hr10": te.hr, "seconds": time.perf_counter() - t0}
    print(json.dumps(out), flush=True)
    with Path(args.out).open("a") as f:
        f.write(json.dumps(out) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True)
    p.add_argument("--cloud-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup", type=float, default=0.0, help="Warm-up epochs.")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--val-smoothing", type=int, default=1,
                   help="Choose the epoch on the mean of the last N validations (as the federated runs' "
                        "val-smoothing); patience counts epochs without a better mean. Default: 1 (no smoothing).")
    p.add_argument("--min-epochs", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=0)
    p.add_argument("--trace-test", action="store_true", help="Print test NDCG@10 every epoch (diagnostic only).")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "outputs" / "central_ref.jsonl"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
