"""Throughput benchmark: fedkd's Flower simulation against a bare PyTorch loop on identical work.

``python -m simulations.perf_bench --help``. For each fleet it runs, in one invocation:

1. the **bare loop**: one process, no Flower, no serialisation; for the same rounds it draws
   the same clients (``fedkd.schedule.select``), gives each the same step allowance (its
   tier's), the same private samples, the same proxy batch and teacher soft labels, and
   trains the same student with the same ``fedkd.local.local_train``; then FedAvg. It is
   timed with 1 and with all torch threads, and the faster is the reference;
2. **fedkd**: ``fedkd run`` in a child process (Flower's simulation engine, Ray workers),
   polled every 0.1 s for the process tree's memory (PSS, so shared pages count once) and
   for the first row of ``timing.csv`` (time to the first round, from the child's start).

Start-up (child start to round 1's start) is split into the engine's (Python imports, Ray,
the simulated nodes), the teacher and proxy set (loaded from the cache), and the handshake
in which every node reports its partition id.

Steady-state throughput is client updates per second over rounds 2..R-1: round 1 warms the
workers up and round R also validates. Both sides run the same rounds, so the ratio is
measured in one run on the same machine (these machines are noisy; absolute figures are not
comparable across runs). The teacher is trained (or loaded from the cache) before either
side is timed.

The table goes to stdout and to ``<out>/perf.md``, the raw figures to ``<out>/perf.json``.
``--scaling`` adds cost per round against clients per round, fleet size and student width,
with a least-squares slope; ``--profile`` adds where a round's time goes (timing.csv's
sections, written by the server).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedkd import streams
from fedkd.streams import Stream
from simulations.runner import APP_DIR, overrides_toml
from simulations.runs import Run, load_run

FLEETS = {
    # name: (overrides, what it is)
    "small": ({"synthetic-users": 125, "clients-per-round": 0}, "100 synthetic clients, every client every round"),
    "ml100k": ({"clients-per-round": 0, "max-len": 50, "cloud-fraction": 0.2},
               "full MovieLens-100K edge fleet (754 clients), every client every round"),
    "synthetic10k": ({"synthetic-users": 12500, "clients-per-round": 100},
                     "10,000 synthetic clients, 100 sampled per round"),
    # issue 19's large fleet: validation every round on a fixed sample of 1,000, the test through
    # every client, at most 2,000 messages in flight, the handshake asking 100 nodes and placing
    # the others by the engine's registration order (docs/performance.md, "100,000 clients").
    # 1% cloud users (1,010 of 101,010): the fleet is what is measured; a teacher on 20% of
    # 125,000 users would cost about 10 minutes an epoch before the timed run even starts.
    "synthetic100k": ({"synthetic-users": 101010, "cloud-fraction": 0.01, "clients-per-round": 100,
                       "val-clients": 1000, "eval-every": 1, "exchange-window": 2000,
                       "handshake": "registration-order"},
                      "100,000 synthetic clients, 100 sampled per round, validation on 1,000, test on all"),
}


@dataclass
class SimResult:
    wall_s: float
    first_round_s: float      # child start -> first row of timing.csv
    startup_s: float          # first_round_s minus round 1's own duration
    peak_pss_mb: float
    peak_rss_mb: float
    rounds: list[dict] = field(default_factory=list)  # timing.csv rows
    metrics: list[dict] = field(default_factory=list)  # metrics.csv rows
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: Run, **measured: float) -> SimResult:
        """A finished run's files, with what was measured from outside it."""
        return cls(**measured, rounds=_csv(run.path / "timing.csv"), metrics=run.rows, summary=run.summary)


def _fused(overrides: dict) -> dict:
    from flwr.common.config import get_fused_config_from_dir

    return get_fused_config_from_dir(APP_DIR, overrides)


def _tree(proc) -> list:
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _memory(procs) -> tuple[float, float]:
    """(PSS, RSS) of the processes in MB; PSS splits shared pages between their users."""
    import psutil

    pss = rss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
        except psutil.Error:
            continue
    return pss / 2**20, rss / 2**20


def _csv(path: Path) -> list[dict]:
    import pandas as pd

    if not path.exists() or path.stat().st_size == 0:
        return []
    return pd.read_csv(path).to_dict("records")


def run_sim(overrides: dict, workdir: Path, *, timeout_s: float) -> SimResult:
    """``fedkd run`` in a child process, watched from outside."""
    import psutil

    name = overrides["experiment-name"]
    cfg_file = workdir / f"{name}.toml"
    cfg_file.write_text(overrides_toml(overrides))
    out = Path(overrides["output-dir"]) / name
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(workdir / f"{name}.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "simulations.cli", "run", "--config", str(cfg_file)],
                                 cwd=APP_DIR, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
    proc = psutil.Process(child.pid)
    first, peak_pss, peak_rss, tick = None, 0.0, 0.0, 0
    try:
        while child.poll() is None:
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"{name}: no result after {timeout_s:.0f} s; see {workdir / (name + '.log')}")
            if tick % 5 == 0:  # memory every 0.5 s: reading smaps is not free
                pss, rss = _memory(_tree(proc))
                peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            if first is None and len(_csv(out / "timing.csv")) >= 1:
                first = time.perf_counter() - t0
            tick += 1
            time.sleep(0.1)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 9)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise RuntimeError(f"{name}: fedkd run exited with {child.returncode}; see {workdir / (name + '.log')}")
    rounds = _csv(out / "timing.csv")
    first = first if first is not None else wall
    return SimResult.from_run(load_run(out), wall_s=wall, first_round_s=first,
                              startup_s=first - float(rounds[0]["round_s"]), peak_pss_mb=peak_pss, peak_rss_mb=peak_rss)


def steady(rows: list[dict], metrics: list[dict]) -> tuple[float, int, float]:
    """(seconds, client updates, updates per second) over rounds 2..R-1."""
    keep = [i for i, row in enumerate(rows) if 1 < int(row["round"]) < len(rows)]
    if not keep:
        raise ValueError("steady state needs at least 3 rounds (round 1 warms up, the last validates)")
    secs = sum(float(rows[i]["round_s"]) for i in keep)
    ups = sum(int(metrics[i]["aggregated"]) for i in keep)
    return secs, ups, ups / secs


class BareLoop:
    """The same training as a fedkd run of ``overrides``, in this process, with nothing else."""

    def __init__(self, overrides: dict, workdir: Path) -> None:
        from fedkd.config import ExperimentConfig
        from fedkd.population import population
        from fedkd.schedule import fleet_profiles, tier_index
        from server.cloud import Cloud

        self.cfg = cfg = ExperimentConfig.from_flat(_fused(overrides))
        cloud = Cloud(cfg)  # the server's own teacher (trained once, then cached) and proxy set
        self.teacher, self.proxy, self.num_items = cloud.teacher, cloud.proxy, cloud.num_items
        n = population(cfg).num_clients
        profiles = fleet_profiles(cfg, n)
        self.tier_of = {p: tier_index(cfg, profiles[p]) for p in range(n)}
        self.pids = list(range(n))

    def run(self, threads: int) -> dict:
        import torch

        from fedkd.aggregate import apply_update, weighted_mean
        from fedkd.budget import StepBudget
        from fedkd.edge import client_data
        from fedkd.local import ProxyBatch, get_state, local_train, set_state
        from fedkd.models import build_model
        from fedkd.proxy import round_rows, soft_labels
        from fedkd.schedule import select

        cfg = self.cfg
        torch.set_num_threads(threads)
        for p in self.pids:  # data loading is start-up, not training
            client_data(cfg, p)
        model = build_model(cfg.student_model(self.num_items), seed=cfg.seed)
        state = get_state(model)
        rows_out = []
        for r in range(1, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            rows = round_rows(len(self.proxy), round_idx=r, size=cfg.proxy_batch, seed=cfg.seed)
            batch = self.proxy[rows]
            sl = soft_labels(self.teacher, batch, temperature=cfg.kd_temperature, top_k=cfg.kd_top_k)
            proxy = ProxyBatch(histories=batch, ids=sl.ids.astype(np.int64), probs=sl.probs.astype(np.float32))
            chosen = select(self.pids, cfg.clients_per_round, rng=streams.rng(cfg.seed, Stream.SELECTION, r),
                            policy=cfg.selection, tier_of=self.tier_of, finishes={p: True for p in self.pids})
            updates, weights, steps = [], [], 0
            for pid in sorted(chosen):
                data = client_data(cfg, pid)
                set_state(model, state)
                torch.manual_seed(streams.torch_seed(cfg.seed, Stream.LOCAL_DROPOUT, r, pid))
                res = local_train(model, data.train, proxy, budget=StepBudget(cfg.tiers[self.tier_of[pid]][2]),
                                  batch_size=cfg.batch_size, kd_batch_size=cfg.kd_batch_size, lr=cfg.local_lr,
                                  kd_weight=cfg.kd_weight, temperature=cfg.kd_temperature,
                                  rng=streams.rng(cfg.seed, Stream.LOCAL_TRAIN, r, pid), optimizer=cfg.local_optimizer,
                                  clip_norm=cfg.local_clip_norm or None)
                trained = get_state(model)
                updates.append({k: trained[k] - state[k] for k in state})
                weights.append(float(res.examples))
                steps += res.steps
            state = apply_update(state, weighted_mean(updates, weights), cfg.server_lr)
            rows_out.append({"round": r, "round_s": time.perf_counter() - t0, "aggregated": len(updates),
                             "steps": steps})
        secs, ups, rate = steady(rows_out, rows_out)
        return {"threads": threads, "rounds": rows_out, "steady_s": secs, "steady_updates": ups,
                "updates_per_s": rate, "total_steps": sum(r["steps"] for r in rows_out)}


def _base(args, name: str, extra: dict) -> dict:
    base = {"num-rounds": args.rounds, "eval-every": 10_000, "progress": False, "seed": args.seed,
            "output-dir": str(args.out / "runs"), "cache-dir": str(args.cache_dir), "experiment-name": name,
            "teacher-max-seconds": args.teacher_max_seconds, "membership-attack": False}
    return {**base, **extra}


def bench_fleet(args, fleet: str) -> dict:
    extra, what = FLEETS[fleet]
    extra = dict(extra)
    if fleet == "ml100k":
        if not args.data_path:
            raise SystemExit("the ml100k fleet needs --data-path (MovieLens-100K u.data)")
        extra["data-path"] = str(Path(args.data_path).resolve())
    overrides = _base(args, f"bench-{fleet}", extra)
    print(f"[{fleet}] {what}: bare loop ...", flush=True)
    bare = BareLoop(overrides, args.out)
    bares = [bare.run(t) for t in args.bare_threads]
    best = max(bares, key=lambda b: b["updates_per_s"])
    print(f"[{fleet}] fedkd simulation ...", flush=True)
    sim = run_sim(overrides, args.out, timeout_s=args.timeout)
    secs, ups, rate = steady(sim.rounds, sim.metrics)
    sim_steps = sum(sum(int(m[c]) * float(m[c.replace("aggregated", "steps_mean")] or 0)
                        for c in m if c.startswith("aggregated_")) for m in sim.metrics)
    bytes_round = float(np.mean([m["bytes_down"] + m["bytes_up"] for m in sim.metrics]))
    return {"fleet": fleet, "what": what, "clients": sim.summary["clients"],
            "clients_per_round": float(np.mean([m["participants"] for m in sim.metrics])),
            "bare": bares, "bare_best_threads": best["threads"], "bare_updates_per_s": best["updates_per_s"],
            "sim_updates_per_s": rate, "ratio": rate / best["updates_per_s"],
            "bare_total_steps": best["total_steps"], "sim_total_steps": round(sim_steps),
            "first_round_s": sim.first_round_s, "startup_s": sim.startup_s, "wall_s": sim.wall_s,
            "cloud_setup_s": sim.summary["startup"]["cloud_setup_s"], "handshake_s": sim.summary["startup"]["handshake_s"],
            "test_s": sim.summary.get("test_s", float("nan")),
            "peak_pss_mb": sim.peak_pss_mb, "peak_rss_mb": sim.peak_rss_mb, "bytes_per_round": bytes_round,
            "timing": sim.rounds}


def bench_point(args, name: str, extra: dict) -> dict:
    """One fedkd run for the scaling table: its steady-state seconds per round. A run that
    fails is recorded with its error, and the table goes on without it. With ``--from-runs``
    the finished run folder is read instead (what is measured from outside, time through
    round 1 and memory, is then unknown)."""
    run = load_run(args.out / "runs" / name)
    if args.from_runs:
        if not run.finished:
            return {"name": name, **extra, "error": f"no finished run in {run.path}"}
        unknown = float("nan")
        sim = SimResult.from_run(run, wall_s=unknown, first_round_s=unknown, startup_s=unknown, peak_pss_mb=unknown,
                                 peak_rss_mb=unknown)
    else:
        try:
            sim = run_sim(_base(args, name, extra), args.out, timeout_s=args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            print(f"[scaling] {name} failed: {exc}", flush=True)
            return {"name": name, **extra, "error": str(exc)}
    secs, ups, rate = steady(sim.rounds, sim.metrics)
    n = len(sim.rounds) - 2
    return {"name": name, **extra, "round_s": secs / n, "updates_per_round": ups / n, "updates_per_s": rate,
            "first_round_s": sim.first_round_s, "peak_pss_mb": sim.peak_pss_mb, "timing": sim.rounds,
            "clients": sim.summary["clients"]}


SCALING = {
    "clients per round (fleet 1,000)": ("clients-per-round", [25, 50, 100, 200],
                                        {"synthetic-users": 1250}),
    "fleet size (100 per round)": ("synthetic-users", [125, 1250, 12500], {"clients-per-round": 100}),
    "student width (fleet 1,000, 100 per round)": ("student-dim", [8, 16, 32],  # the calibrated widths end at 32
                                                   {"synthetic-users": 1250, "clients-per-round": 100}),
}


def slope(xs, ys) -> tuple[float, float, float]:
    """Least-squares line y = a + b x: (a, b, r^2)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(xs, ys, 1)
    pred = a + b * xs
    ss = float(((ys - ys.mean()) ** 2).sum())
    return float(a), float(b), 1 - float(((ys - pred) ** 2).sum()) / ss if ss else 1.0


def profile_rows(timing: list[dict]) -> dict[str, float]:
    """Mean seconds per steady round in each server section; 'wait' is exchange minus audit."""
    from server.transport import Profile

    keep = [t for t in timing if 1 < int(t["round"]) < len(timing)]
    out = {k: float(np.mean([float(t.get(k, 0) or 0) for t in keep])) for k in ("round_s", *Profile.SECTIONS)}
    out["wait_s"] = out["exchange_s"] - out["audit_s"]
    return out


def render(results: dict, args) -> str:
    lines = [f"Command: `{' '.join(['python -m simulations.perf_bench', *sys.argv[1:]])}`", "",
             f"Machine: {os.cpu_count()} CPUs; torch threads per simulated client 1; "
             f"{args.rounds} rounds per run; steady state = rounds 2..{args.rounds - 1}.", ""]
    fleets = results.get("fleets", [])
    if fleets:
        lines += ["| fleet | clients | per round | bare loop updates/s (threads) | fedkd updates/s | ratio | "
                  "local steps bare / fedkd | time through round 1 s | start-up s (engine + teacher + handshake) | wall s | peak memory MB (PSS / RSS) | "
                  "bytes per round |", "|" + "---|" * 12]
        for f in fleets:
            lines.append(f"| {f['fleet']} | {f['clients']} | {f['clients_per_round']:.0f} | "
                         f"{f['bare_updates_per_s']:.1f} ({f['bare_best_threads']}) | {f['sim_updates_per_s']:.1f} | "
                         f"{f['ratio']:.2f} | {f['bare_total_steps']} / {f['sim_total_steps']} | "
                         f"{f['first_round_s']:.1f} | {f['startup_s']:.1f} ({f['startup_s'] - f['cloud_setup_s'] - f['handshake_s']:.1f} + "
                         f"{f['cloud_setup_s']:.1f} + {f['handshake_s']:.1f}) | {f['wall_s']:.0f} | "
                         f"{f['peak_pss_mb']:.0f} / {f['peak_rss_mb']:.0f} | {f['bytes_per_round'] / 1e3:.0f} kB |")
        lines += ["", "What grows with the fleet: the handshake (every node) and the final test (every client).", "",
                  "| fleet | clients | handshake s | ms per node | test s | ms per client |",
                  "|" + "---|" * 6]
        for f in fleets:
            test_s = f.get("test_s", float("nan"))
            lines.append(f"| {f['fleet']} | {f['clients']} | {f['handshake_s']:.1f} | "
                         f"{1e3 * f['handshake_s'] / max(f['clients'], 1):.2f} | {test_s:.1f} | "
                         f"{1e3 * test_s / max(f['clients'], 1):.2f} |")
        lines += ["", "Bare loop, updates/s by torch threads: " + "; ".join(
            f"{f['fleet']}: " + ", ".join(f"{b['threads']}: {b['updates_per_s']:.1f}" for b in f["bare"])
            for f in fleets), ""]
    for title, all_pts in results.get("scaling", {}).items():
        key = SCALING[title][0]
        pts = [p for p in all_pts if "error" not in p]
        failed = [p for p in all_pts if "error" in p]
        if len(pts) < 2:
            lines += [f"**Cost per round vs {title}**: too few finished runs"] + \
                [f"- {p[key]}: {p['error']}" for p in failed] + [""]
            continue
        a, b, r2 = slope([p[key] for p in pts], [p["round_s"] for p in pts])
        lines += [f"**Cost per round vs {title}**: fit round_s = {a:.3f} + {b * 1e3:.3f} ms x {key} "
                  f"(r^2 {r2:.3f})", "",
                  f"| {key} | clients | updates/round | s/round | ms per update | updates/s | time to first round s | "
                  "peak PSS MB |", "|" + "---|" * 8]
        for p in pts:
            lines.append(f"| {p[key]} | {p['clients']} | {p['updates_per_round']:.0f} | {p['round_s']:.2f} | "
                         f"{1e3 * p['round_s'] / p['updates_per_round']:.1f} | {p['updates_per_s']:.1f} | "
                         f"{p['first_round_s']:.1f} | {p['peak_pss_mb']:.0f} |")
        lines += [f"| {p[key]} | failed: {p['error'][:120]} |" for p in failed]
        lines.append("")
    prof = results.get("profile", {})
    if prof:
        from server.transport import Profile
        cols = ["round_s", *Profile.SECTIONS, "wait_s"]
        lines += ["**Where a steady round's wall time goes** (server sections, mean s per round; "
                  "client_train_s sums the clients' own training time, which runs in parallel workers)", "",
                  "| run | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for name, p in prof.items():
            lines.append(f"| {name} | " + " | ".join(f"{p[c]:.3f}" for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.perf_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fleets", nargs="*", default=["small", "ml100k", "synthetic10k"], choices=list(FLEETS),
                   help="fleets to compare against the bare loop (none: only --scaling)")
    p.add_argument("--data-path", default="", help="MovieLens-100K u.data, for the ml100k fleet")
    p.add_argument("--bare-threads", type=int, nargs="+", default=[1],
                   help="torch thread counts to time the bare loop with; the fastest is the reference")
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (at least 3: steady state is 2..R-1)")
    p.add_argument("--scaling", action="store_true", help="also measure cost per round vs clients per round, "
                                                          "fleet size and student width")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--out", type=Path, default=Path("outputs/perf"), help="results folder (perf.md, perf.json, runs/)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/fedkd"), help="teacher cache")
    p.add_argument("--teacher-max-seconds", type=float, default=120.0,
                   help="cap on teacher training (it is trained before anything is timed)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a simulation is killed")
    p.add_argument("--from-runs", action="store_true",
                   help="rebuild the scaling table and profile from the run folders under --out/runs instead of "
                        "running (time through round 1 and memory, measured from outside, are then n/a)")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    args.out = args.out.resolve()
    args.cache_dir = args.cache_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"fleets": [], "scaling": {}, "profile": {}}
    name = "perf-from-runs" if args.from_runs else "perf"

    def save() -> str:  # after every fleet and point: a later failure loses nothing measured
        text = render(results, args)
        (args.out / f"{name}.md").write_text(text + "\n")
        (args.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=float))
        return text

    for fleet in [] if args.from_runs else args.fleets:
        res = bench_fleet(args, fleet)
        results["fleets"].append(res)
        results["profile"][f"fleet {fleet}"] = profile_rows(res["timing"])
        print(render({"fleets": [res]}, args), flush=True)
        save()
    if args.scaling or args.from_runs:
        for title, (key, values, extra) in SCALING.items():
            pts = results["scaling"].setdefault(title, [])
            for v in values:
                print(f"[scaling] {key} = {v} ...", flush=True)
                pts.append(bench_point(args, f"scale-{key}-{v}", {**extra, key: v}))
                if "error" not in pts[-1]:
                    results["profile"][f"{key} {v}"] = profile_rows(pts[-1]["timing"])
                save()
    text = save()
    print(text)
    print(f"written: {args.out / (name + '.md')}, {args.out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
