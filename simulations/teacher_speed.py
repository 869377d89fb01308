"""Teacher training and soft-label speed, in samples per second, on CPU or a GPU.

``python -m simulations.teacher_speed --help``. Uses the cloud users' training samples of the
configured data (MovieLens-100K with ``--data-path``, else the synthetic generator), the
configured teacher (SASRec, width 64, 2 blocks by default) and the library's own
``fedkd.train.train_step``, so what is timed is what ``fedkd run`` trains. Needs only the core
library (no Flower): it runs on a bare GPU machine with torch, numpy and pandas.

Timed after warm-up steps, with the device synchronised around the timed loop. Prints a table
and writes it (with the raw figures) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.config import ExperimentConfig
from fedkd.models import build_model
from fedkd.population import population
from fedkd.samples import train_samples
from fedkd.train import train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: ExperimentConfig, device: torch.device, *, batch_sizes: list[int], steps: int, warmup: int,
            amp: bool) -> list[dict]:
    pop = population(cfg)
    seqs = pop.dataset.sequences
    hist, target = train_samples([seqs[u][:-2] for u in pop.cloud_users], cfg.max_len)
    rows = []
    for bs in batch_sizes:
        torch.manual_seed(0)
        model = build_model(cfg.teacher_model(pop.dataset.num_items), seed=0).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.teacher_lr)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, len(target), bs) for _ in range(warmup + steps)]
        h = [torch.from_numpy(hist[b]).to(device) for b in batches]
        t = [torch.from_numpy(target[b]).to(device) for b in batches]
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else torch.autocast(device.type, enabled=False)
        with ctx:
            for i in range(warmup):
                train_step(model, opt, h[i], t[i])
            _sync(device)
            t0 = time.perf_counter()
            for i in range(warmup, warmup + steps):
                train_step(model, opt, h[i], t[i])
            _sync(device)
            train_s = time.perf_counter() - t0
            model.eval()
            with torch.no_grad():
                for i in range(warmup):
                    model(h[i])
                _sync(device)
                t0 = time.perf_counter()
                for i in range(warmup, warmup + steps):
                    model(h[i])
                _sync(device)
                infer_s = time.perf_counter() - t0
        rows.append({"device": str(device), "batch_size": bs, "amp_bf16": amp, "steps": steps,
                     "train_samples_per_s": bs * steps / train_s, "infer_samples_per_s": bs * steps / infer_s,
                     "epoch_s": len(target) / (bs * steps / train_s), "cloud_samples": int(len(target))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.teacher_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", default="", help="interaction file (u.data); empty = synthetic data")
    p.add_argument("--cloud-fraction", type=float, default=0.2, help="share of users in the cloud")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or cuda:N")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024], help="batch sizes to time")
    p.add_argument("--steps", type=int, default=30, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--amp", action="store_true", help="also time bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", type=Path, default=Path("outputs/perf/teacher_speed.json"), help="where to write")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ExperimentConfig.from_flat({"data-path": args.data_path, "cloud-fraction": args.cloud_fraction,
                                      "max-len": 50})
    device = torch.device(args.device)
    rows = measure(cfg, device, batch_sizes=args.batch_sizes, steps=args.steps, warmup=args.warmup, amp=False)
    if args.amp:
        rows += measure(cfg, device, batch_sizes=args.batch_sizes, steps=args.steps, warmup=args.warmup, amp=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    lines = [f"Teacher {cfg.teacher_kind} dim {cfg.teacher_dim} x {cfg.teacher_blocks} blocks, max-len {cfg.max_len}, "
             f"{rows[0]['cloud_samples']} cloud training samples; {name}; torch {torch.__version__}", "",
             "| device | batch | bf16 autocast | train samples/s | soft-label (inference) samples/s | epoch s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['device']} | {r['batch_size']} | {r['amp_bf16']} | {r['train_samples_per_s']:,.0f} | "
              f"{r['infer_samples_per_s']:,.0f} | {r['epoch_s']:.2f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device_name": name, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                                    "rows": rows, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
