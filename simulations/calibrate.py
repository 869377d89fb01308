"""Measure, on this machine, what one student step and one top-10 request cost.

    python -m simulations.calibrate --data-path /work/shared/data/ml-100k/u.data

For every student width it times, with one torch thread as a simulated client uses:

* one local training step exactly as a client runs it (``fedkd.train.train_step``:
  cross-entropy on ``--batch-size`` private prefixes plus distillation on
  ``--kd-batch-size`` proxy rows with top-``--kd-top-k`` soft labels, SGD with the
  config's local learning rate and gradient clipping), every step from the same
  weights; and, as a cross-check, the mean step of a whole ``fedkd.local.local_train``
  call (optimiser set-up and batch sampling included);
* one top-10 recommendation (batch 1, full ranking over the catalogue with the
  history masked), and one batch of 64 such requests.

Each measurement is warmed up, then repeated (``--repeats``), stopping early once the
width's time budget (``--max-seconds``) is spent. Both wall time and the measuring
thread's CPU time are recorded; ``--clock`` picks the one the simulator reads (wall on
a dedicated device; cpu on a machine other jobs keep busy, where wall time also counts
the waits for a core). The JSON written to ``--out`` is what
``fedkd.simtime.load_calibration`` reads: the simulator takes ``train_step_s`` as the
step time of a ``speed = 1.0`` device. Run the same command on a real device (with the
same data, so ``num_items`` and ``max_len`` match) and give ``--reference`` the
simulator's calibration to get that device's ``speed`` in its profile.
Network bandwidth is not measured: set it in the tiers or a device trace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fedkd.budget import StepBudget
from fedkd.config import ExperimentConfig
from fedkd.local import ProxyBatch, local_train
from fedkd.models import ModelConfig, build_model, num_parameters
from fedkd.simtime import CALIBRATION_FORMAT, load_calibration, relative_speed
from fedkd.train import train_step

DEFAULTS = ExperimentConfig()


def _cpu_model() -> str:
    """``model name`` (x86), else ``Hardware`` / ``Model`` (ARM boards) of /proc/cpuinfo."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
        for key in ("model name", "hardware", "model"):
            if fields.get(key):
                return fields[key]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB -> MB
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info(threads: int) -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_mb": _memory_mb(),
            "torch": torch.__version__, "torch_threads": threads, "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def histories(args: argparse.Namespace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(H, L) histories, (H,) targets, num_items and a description of where they came from."""
    if args.data_path:
        from fedkd.population import load_dataset
        from fedkd.samples import train_samples

        ds = load_dataset(DEFAULTS.replace(data_path=args.data_path, data_format=args.data_format))
        hist, target = train_samples([s[:-2] for s in ds.sequences], args.max_len)
        take = rng.choice(len(target), size=min(4096, len(target)), replace=False)
        return hist[take], target[take], ds.num_items, f"{args.data_path} ({ds.num_users} users)"
    n = args.num_items
    hist = rng.integers(1, n + 1, size=(4096, args.max_len), dtype=np.int64)
    return hist, rng.integers(1, n + 1, size=4096, dtype=np.int64), n, f"random full-length histories, {n} items"


def _timed(fn, repeats: int, warmup: int, deadline: float, min_repeats: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Wall and thread-CPU seconds of ``repeats`` calls (fewer once ``deadline`` passes)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    while len(wall) < repeats and (len(wall) < min_repeats or time.perf_counter() < deadline):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return np.asarray(wall), np.asarray(cpu)


def top10(model: torch.nn.Module, hist: torch.Tensor) -> torch.Tensor:
    """What a device does to answer a request: score all items, mask the history, take 10."""
    with torch.no_grad():
        scores = model(hist)  # (B, N + 1)
        scores.scatter_(1, hist, -torch.inf)  # history (and padding 0) can't be recommended
        return scores.topk(10, dim=1).indices  # (B, 10)


def measure_width(width: int, args: argparse.Namespace, data: tuple[np.ndarray, np.ndarray, int],
                  rng: np.random.Generator) -> dict:
    hist, target, num_items = data
    cfg = ModelConfig(kind=args.kind, num_items=num_items, dim=width, blocks=args.blocks, heads=args.heads,
                      max_len=args.max_len, dropout=args.dropout)
    model = build_model(cfg, seed=args.seed)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    k = min(args.kd_top_k, num_items)
    P = max(args.proxy_batch, args.kd_batch_size)
    proxy_rows = rng.choice(len(target), size=P, replace=len(target) < P)
    ids = np.stack([rng.choice(np.arange(1, num_items + 1), size=k, replace=False) for _ in range(P)])
    probs = (rng.dirichlet(np.ones(k), size=P) * 0.8).astype(np.float32)  # 20% of the mass outside the top-k
    proxy = ProxyBatch(histories=hist[proxy_rows], ids=ids.astype(np.int64), probs=probs)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    budget_end = time.perf_counter() + args.max_seconds

    def one_step() -> None:
        model.load_state_dict(start)  # every timed step from the same weights (no drift to NaN)
        b = rng.choice(len(target), size=args.batch_size, replace=False)
        j = rng.choice(P, size=min(args.kd_batch_size, P), replace=False)
        kd = (torch.from_numpy(proxy.histories[j]), torch.from_numpy(proxy.ids[j]), torch.from_numpy(proxy.probs[j]))
        c0, t0 = time.thread_time(), time.perf_counter()
        train_step(model, opt, torch.from_numpy(hist[b]), torch.from_numpy(target[b]), kd=kd,
                   kd_weight=args.kd_weight, temperature=args.temperature, clip_norm=args.clip_norm or None)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)

    times: list[float] = []
    cpu_times: list[float] = []
    for _ in range(args.warmup):
        one_step()
    times.clear()
    cpu_times.clear()
    train_end = time.perf_counter() + 0.55 * args.max_seconds
    while len(times) < args.repeats and (len(times) < 5 or time.perf_counter() < train_end):
        one_step()
    train, train_cpu = np.asarray(times), np.asarray(cpu_times)

    model.load_state_dict(start)
    loop_steps = max(5, min(args.repeats, 20))
    c0, t0 = time.thread_time(), time.perf_counter()
    local_train(model, (hist, target), proxy, budget=StepBudget(loop_steps), batch_size=args.batch_size,
                kd_batch_size=args.kd_batch_size, lr=args.lr, kd_weight=args.kd_weight,
                temperature=args.temperature, rng=np.random.default_rng([args.seed, width]),
                clip_norm=args.clip_norm or None)
    loop_s = (time.perf_counter() - t0) / loop_steps
    loop_cpu_s = (time.thread_time() - c0) / loop_steps

    model.load_state_dict(start)
    model.eval()
    one = [torch.from_numpy(hist[i:i + 1]) for i in rng.choice(len(target), size=64)]
    batch64 = torch.from_numpy(hist[rng.choice(len(target), size=64, replace=False)])
    it = iter(range(10 ** 9))
    remaining = max(budget_end - time.perf_counter(), 0.0)
    infer1, infer1_cpu = _timed(lambda: top10(model, one[next(it) % 64]), args.infer_repeats, args.warmup,
                                time.perf_counter() + 0.6 * remaining)
    infer64, infer64_cpu = _timed(lambda: top10(model, batch64), max(args.infer_repeats // 10, 5),
                                  max(args.warmup // 2, 1), budget_end)
    clocks = {name: {"train_step_s": float(np.median(tr)), "train_step_p90_s": float(np.quantile(tr, 0.9)),
                     "local_train_step_s": loop,
                     "infer_top10_s": float(np.median(i1)), "infer_top10_p99_s": float(np.quantile(i1, 0.99)),
                     "infer_batch64_s": float(np.median(i64))}
              for name, tr, loop, i1, i64 in (("wall", train, loop_s, infer1, infer64),
                                              ("cpu", train_cpu, loop_cpu_s, infer1_cpu, infer64_cpu))}
    # The simulator reads the top-level fields: those of the chosen clock. Both stay in the file;
    # wall over cpu shows how much other processes slowed the measurement down.
    return {"width": width, "params": num_parameters(model), **clocks[args.clock], **clocks,
            "repeats": {"train": len(train), "infer_top10": len(infer1), "infer_batch64": len(infer64)}}


def markdown(result: dict) -> str:
    clock = result["clock"]
    other = {"wall": "cpu", "cpu": "wall"}[clock]
    names = {"wall": "wall time", "cpu": "the measuring thread's CPU time"}
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}, {result['machine']['torch_threads']} thread(s); "
             f"{result['num_items']} items, max-len {result['max_len']}, "
             f"{result['model']['kind']} {result['model']['blocks']} block(s). Times are medians in ms of "
             f"{names[clock]} ({other}: medians of {names[other]}); 1-minute load average "
             f"{result['machine']['load_average_1m_at_start']} at start.",
             "",
             f"| width | params | train step ms | p90 | {other} | local_train step ms | top-10 ms (batch 1) | "
             f"p99 | {other} | batch of 64 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in result["widths"]:
        lines.append(f"| {w['width']} | {w['params']:,} | {w['train_step_s'] * 1e3:.2f} | "
                     f"{w['train_step_p90_s'] * 1e3:.2f} | {w[other]['train_step_s'] * 1e3:.2f} | "
                     f"{w['local_train_step_s'] * 1e3:.2f} | "
                     f"{w['infer_top10_s'] * 1e3:.3f} | {w['infer_top10_p99_s'] * 1e3:.3f} | "
                     f"{w[other]['infer_top10_s'] * 1e3:.3f} | "
                     f"{w['infer_batch64_s'] * 1e3:.2f} |")
    return "\n".join(lines)


def parser(prog: str = "fedkd calibrate") -> argparse.ArgumentParser:
    from simulations.options import Parser, RawHelpFormatter
    p = Parser(prog=prog, description=__doc__, formatter_class=RawHelpFormatter)
    d = DEFAULTS
    g = p.add_argument_group("model (defaults: the fedkd default student)")
    g.add_argument("--widths", default="4,8,16,32",
                   help="Comma-separated student widths to measure (default: %(default)s).")
    g.add_argument("--kind", default=d.student_kind, choices=("sasrec", "meanpool"),
                   help="Student architecture (default: %(default)s).")
    g.add_argument("--blocks", type=int, default=d.student_blocks, help="Transformer blocks (default: %(default)s).")
    g.add_argument("--heads", type=int, default=d.student_heads,
                   help="Attention heads; must divide every width (default: %(default)s).")
    g.add_argument("--dropout", type=float, default=d.student_dropout,
                   help="Dropout, active in training steps (default: %(default)s).")
    g.add_argument("--max-len", type=int, default=d.max_len, help="History length (default: %(default)s).")
    g = p.add_argument_group("catalogue (the output layer scores every item, so its size matters)")
    g.add_argument("--data-path", default="",
                   help="Interaction file (as data-path of an experiment): its item count and real "
                        "training prefixes are used. Empty: random histories over --num-items items.")
    g.add_argument("--data-format", default="auto", help="Format of --data-path (default: %(default)s).")
    g.add_argument("--num-items", type=int, default=d.synthetic_items,
                   help="Catalogue size without --data-path (default: %(default)s, as synthetic data).")
    g = p.add_argument_group("local step (defaults: the experiment defaults)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="Private samples per step (default: %(default)s).")
    g.add_argument("--kd-batch-size", type=int, default=d.kd_batch_size,
                   help="Proxy rows per step; 0 = no distillation term (default: %(default)s).")
    g.add_argument("--kd-top-k", type=int, default=d.kd_top_k,
                   help="Soft labels per proxy row (default: %(default)s).")
    g.add_argument("--proxy-batch", type=int, default=d.proxy_batch,
                   help="Proxy rows a client holds in a round, sampled from per step (default: %(default)s).")
    g.add_argument("--kd-weight", type=float, default=d.kd_weight, help="Distillation weight (default: %(default)s).")
    g.add_argument("--temperature", type=float, default=d.kd_temperature,
                   help="Distillation temperature (default: %(default)s).")
    g.add_argument("--lr", type=float, default=d.local_lr, help="SGD learning rate (default: %(default)s).")
    g.add_argument("--clip-norm", type=float, default=d.local_clip_norm,
                   help="Gradient clipping norm, 0 = none (default: %(default)s).")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=200,
                   help="Timed training steps per width (default: %(default)s; fewer if --max-seconds runs out).")
    g.add_argument("--infer-repeats", type=int, default=500,
                   help="Timed batch-1 top-10 requests per width; a tenth as many batches of 64 "
                        "(default: %(default)s).")
    g.add_argument("--warmup", type=int, default=10,
                   help="Untimed runs before each measurement (default: %(default)s).")
    g.add_argument("--max-seconds", type=float, default=10.0,
                   help="Time budget per width; repetitions stop early once it is spent (default: %(default)s).")
    g.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="What the simulator's step times (train_step_s, ...) measure: wall time "
                        "(default, right on a dedicated device) or the measuring thread's CPU time "
                        "(right on a machine that other jobs keep busy, where wall time includes "
                        "waiting for a core). Both are written either way.")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s, as a simulated client uses).")
    g.add_argument("--seed", type=int, default=0, help="Seed of weights and sampled batches (default: %(default)s).")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("docs/calibration.json"),
                   help="Calibration JSON to write (default: %(default)s).")
    g.add_argument("--reference", type=Path, default=None,
                   help="Calibration of the simulator's machine: adds this machine's relative speed "
                        "(profile.speed) to the output.")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    try:
        widths = sorted({int(w) for w in args.widths.split(",") if w.strip()})
    except ValueError:
        p.error(f"--widths must be comma-separated integers, got {args.widths!r}")
    if not widths or min(widths) < 1:
        p.error(f"--widths must be integers >= 1, got {args.widths!r}")
    if args.kind == "sasrec" and any(w % args.heads for w in widths):
        p.error(f"--heads {args.heads} must divide every width in {widths}")
    for name in ("max_len", "batch_size", "kd_top_k", "proxy_batch", "repeats", "infer_repeats", "threads",
                 "num_items", "blocks", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kd_batch_size < 0 or args.warmup < 0 or args.max_seconds <= 0:
        p.error("--kd-batch-size and --warmup must be >= 0 and --max-seconds > 0")
    if args.kd_batch_size == 0:
        args.kd_weight = 0.0
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    hist, target, num_items, source = histories(args, rng)
    result = {
        "format": CALIBRATION_FORMAT,
        "command": shlex.join(["python", "-m", "simulations.calibrate", *argv]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "clock": args.clock,
        "num_items": int(num_items), "max_len": args.max_len, "data": source,
        "model": {"kind": args.kind, "blocks": args.blocks, "heads": args.heads, "dropout": args.dropout},
        "step": {"batch_size": args.batch_size, "kd_batch_size": args.kd_batch_size, "kd_top_k": args.kd_top_k,
                 "proxy_batch": args.proxy_batch, "kd_weight": args.kd_weight, "temperature": args.temperature,
                 "optimizer": "sgd", "lr": args.lr, "clip_norm": args.clip_norm},
        "widths": [],
    }
    for w in widths:
        result["widths"].append(measure_width(w, args, (hist, target, num_items), rng))
        print(f"width {w}: step {result['widths'][-1]['train_step_s'] * 1e3:.2f} ms", file=sys.stderr)
    result["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    profile = {"speed": 1.0, "memory_mb": result["machine"]["memory_mb"]}
    if args.reference is not None:
        profile["speed"] = relative_speed(load_calibration(args.reference), load_calibration(result))
        profile["speed_reference"] = str(args.reference)
    result["profile"] = profile
    load_calibration(result)  # what we write must read back
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
