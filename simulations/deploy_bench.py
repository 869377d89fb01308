"""Where the time of a Deployment Engine exchange goes, before and after the fast ClientApp path.

    python -m simulations.deploy_bench --nodes 3 --rounds 3             # every variant, then docs/devices.md
    python -m simulations.deploy_bench --variants flower worker --no-doc

Runs ``fedkd deploy local`` (a SuperLink and --nodes SuperNodes on 127.0.0.1, synthetic data:
50 users, 80 items, a 2-epoch teacher, validation every round) once per variant, one after the
other, with ``FEDKD_PROFILE_DIR`` set, so that the ServerApp, the SuperNodes, the ClientApp
worker and the ClientApp record when each message was pushed, taken, received in full, claimed,
handled and answered (:mod:`fedkd.timeline`). It joins the records by Flower's message id into
the life of every training message, averages each phase over the messages (one device's part
of one exchange), adds the ServerApp's own ``timing.csv`` (``exchange_s``: a round's training
exchange; ``validate_s``), and prints a markdown table with one column per variant. It also
times, in fresh processes, the import of the ClientApp module and torch's first optimiser step.

The variants (:data:`VARIANTS`): Flower's defaults (before), Flower's process per message with
fedkd's short polls, the long-lived worker with Flower's polls, and ``fedkd deploy local``'s
default (after). Every variant must give the same round-1 model (``model_digest``), which the
bench checks. Timings depend on the machine and its load (printed with the table): compare the
columns of one invocation, not runs on different days.

Writes ``--out``/bench.json and bench.md and, unless ``--no-doc``, the ``<!-- deploy-bench -->``
block of docs/devices.md (prose around it survives a rerun).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedkd import timeline
from simulations import ROOT
from simulations.docsplice import splice

SECTION = "deploy-bench"

# name -> (what it is, `fedkd deploy local` options, extra environment)
VARIANTS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "flower": ("Flower's defaults (before): a `flwr-clientapp` process per message; the SuperNode polls every 3 s "
               "when idle, the SuperExec every 1 s, the ServerApp every 3 s; content not there yet is retried "
               "after 1 s, 2 s, 4 s ...",
               ["--clientapp", "flower", "--supernode-poll", "3", "--reply-poll-interval", "3"], {}),
    "flower-polls": ("a process per message with fedkd's polls: the SuperNode 0.1 s after a message (up to 1 s when "
                     "idle), the SuperExec 0.1 s, the ServerApp 0.1 s; content retried after 0.05 s, at most 0.5 s "
                     "apart (except in the `flwr-clientapp` processes: Flower's)",
                     ["--clientapp", "flower", "--supernode-poll", "0.1", "--reply-poll-interval", "0.1"],
                     {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}),
    "worker-flower-polls": ("one long-lived ClientApp worker per SuperNode (its own claims and retries as below); "
                            "the SuperNode and the ServerApp poll and retry as Flower's",
                            ["--clientapp", "worker", "--supernode-poll", "3", "--reply-poll-interval", "3"], {}),
    "worker": ("`fedkd deploy local`'s default (after): the worker (claims 0.05 s after a task, up to 0.5 s when "
               "idle) and fedkd's polls and retries everywhere",
               ["--clientapp", "worker", "--supernode-poll", "0.1", "--reply-poll-interval", "0.1"], {}),
}
SETTINGS = ["--synthetic-users", "50", "--synthetic-items", "80", "--teacher-epochs", "2", "--progress", "false"]

# The phases of one message, in order: (key, label). Each is the time between two records.
PHASES = [
    ("to_node", "ServerApp → SuperNode: the ServerApp's push, the SuperNode's poll (Flower: 3 s when idle)"),
    ("content", "the SuperNode pulls the content (retried while the ServerApp still pushes it: Flower after 1 s, "
                "2 s, 4 s ...)"),
    ("claim", "SuperNode → ClientApp: the task claimed (SuperExec: every 1 s, then a new process; worker: polls)"),
    ("startup", "ClientApp ready: Python start-up, imports, FAB install, Flower's task input (worker: task input)"),
    ("data", "the device's config, population and partition (`fedkd.population`, `fedkd.edge`)"),
    ("training", "local training (the reply's `train-seconds`)"),
    ("handler", "rest of the handler: decode the student and proxy, build the model, encode the update"),
    ("to_supernode", "reply → SuperNode: push, process exit, the SuperNode's check for it (Flower: every 0.5 s)"),
    ("to_server", "SuperNode → ServerApp: push, the ServerApp's poll (Flower: 3 s), its content retries"),
]


# --------------------------------------------------------------------------- analysis
def message_phases(events: list[dict]) -> list[dict]:
    """One row per message that has a ServerApp and a ClientApp record: its kind, round, partition
    and phases (s), which add up to its total (push started to reply pulled).

    ``events``: what :func:`fedkd.timeline.read` returns for one deployment. The points of a
    message's life are taken in order, each no earlier than the one before (a process per
    message may be started before its SuperNode has the whole message: it then waits in its
    start-up); a point without a record (a SuperNode run without the launcher) leaves its phase
    out (NaN) and its time to the next one.
    """
    by_id: dict[str, dict] = {}
    for e in events:
        slot = by_id.setdefault(e["message_id"], {})
        if e["role"] == "supernode":
            slot.setdefault("supernode", {})[e["event"]] = e["t"]
        else:
            slot[e["role"]] = e
    rows = []
    for mid, d in by_id.items():
        if not {"server", "client"} <= d.keys():
            continue
        s, c, n, w = d["server"], d["client"], d.get("supernode", {}), d.get("worker")
        # the long-lived worker claims a task; a process per message starts for it
        claimed = w["claimed"] if w is not None else c["process_start"]
        points = [("to_node", n.get("received", math.nan)), ("content", n.get("stored", math.nan)),
                  ("claim", claimed), ("startup", c["entered"]), ("data", c["data_ready"]), ("work", c["done"]),
                  ("to_supernode", n.get("sending", math.nan)), ("to_server", s["pulled"])]
        row = {"message_id": mid, "kind": s["kind"], "round": s["round"], "partition_id": c["partition_id"],
               "push_started": s["push_started"], "pulled": s["pulled"], "total": s["pulled"] - s["push_started"]}
        last = s["push_started"]
        for key, t in points:
            if math.isnan(t):
                row[key] = math.nan
                continue
            t = max(t, last)
            row[key], last = t - last, t
        work = row.pop("work")
        row["training"] = min(c["train_seconds"], work)
        row["handler"] = work - row["training"]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["push_started"], r["partition_id"]))


def exchanges(rows: list[dict], kind: str = "train") -> list[dict]:
    """Per exchange (one push of ``kind`` messages): its round and first push to last reply (s)."""
    out: dict[float, dict] = {}
    for r in rows:
        if r["kind"] == kind:
            ex = out.setdefault(r["push_started"], {"round": r["round"], "start": r["push_started"], "end": 0.0})
            ex["end"] = max(ex["end"], r["pulled"])
    ordered = sorted(out.values(), key=lambda e: e["start"])
    return [{"round": e["round"], "seconds": e["end"] - e["start"]} for e in ordered]


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarise(rows: list[dict], timing: list[dict]) -> dict:
    """Means over the training messages (per phase), the exchanges and timing.csv's columns."""
    train = [r for r in rows if r["kind"] == "train"]
    ex = exchanges(rows, "train")
    col = lambda name, rs=timing: [float(t[name]) for t in rs]  # noqa: E731
    return {"messages": len(train), "phases": {k: mean(r[k] for r in train) for k, _ in PHASES},
            "message_total": mean(r["total"] for r in train),
            "exchange_timeline": mean(e["seconds"] for e in ex),
            "exchange_s": mean(col("exchange_s")), "exchange_s_round1": mean(col("exchange_s", timing[:1])),
            "exchange_s_later": mean(col("exchange_s", timing[1:])), "validate_s": mean(col("validate_s")),
            "round_s": mean(col("round_s")),
            "eval_message_total": mean(r["total"] for r in rows if r["kind"] == "evaluate")}


# --------------------------------------------------------------------------- running
def run_variant(args: argparse.Namespace, name: str) -> dict:
    what, options, extra_env = VARIANTS[name]
    folder = args.out / name
    shutil.rmtree(folder, ignore_errors=True)
    profile = folder / "profile"
    cmd = [sys.executable, "-m", "simulations.cli", "deploy", "local", "--nodes", str(args.nodes),
           "--state-dir", str(folder / "state"), "--experiment-name", name, "--output-dir", str(folder / "out"),
           "--cache-dir", str(args.cache_dir), "--timeout", str(args.timeout), "--num-rounds", str(args.rounds),
           "--seed", str(args.seed), *SETTINGS, *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", timeline.ENV: str(profile), **extra_env}
    print(f"[deploy-bench] {name}: {shlex.join(cmd[1:])}", flush=True)
    load0, t0 = os.getloadavg()[0], time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, load1 = time.monotonic() - t0, os.getloadavg()[0]
    (folder / "deploy.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name}: `fedkd deploy local` exited {proc.returncode}; see {folder / 'deploy.log'}"
                           f"\n{(proc.stdout + proc.stderr)[-3000:]}")
    results = folder / "out" / name
    timing = list(csv.DictReader((results / "timing.csv").open()))
    metrics = list(csv.DictReader((results / "metrics.csv").open()))
    rows = message_phases(timeline.read(profile))
    (folder / "messages.json").write_text(json.dumps(rows, indent=1))
    return {"variant": name, "what": what, "options": options, "env": extra_env, "wall_s": wall,
            "load": [load0, load1], "digest_round1": metrics[0]["model_digest"],
            "digests": [m["model_digest"] for m in metrics], **summarise(rows, timing)}


def import_costs() -> dict[str, float]:
    """Seconds, in fresh processes here: importing torch, the ClientApp module, and torch's first
    optimiser step after the imports (what a process per message pays every time)."""
    code = ("import time; t0 = time.time(); import torch; t1 = time.time(); import clients.client_app; "
            "t2 = time.time(); w = torch.nn.Parameter(torch.zeros(2)); o = torch.optim.SGD([w], lr=0.1); "
            "w.sum().backward(); o.step(); t3 = time.time(); print(t1 - t0, t2 - t0, t3 - t2)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    return {"torch": float(out[0]), "clientapp_module": float(out[1]), "first_step": float(out[2])}


# --------------------------------------------------------------------------- report
def _f(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def render(results: list[dict], costs: dict | None, args: argparse.Namespace) -> str:
    names = [r["variant"] for r in results]
    loads = [x for r in results for x in r["load"]]
    lines = [f"Command: `python -m simulations.deploy_bench {' '.join(args.argv)}`; {platform.machine()}, "
             f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; load average (1 min) during the runs "
             f"{min(loads):.1f}-{max(loads):.1f}. {args.nodes} SuperNodes on loopback, {args.rounds} rounds, "
             "validation every round, 50 synthetic users (40 at the edge, 14 per device), 80 items.", ""]
    lines += [f"- **{r['variant']}**: {r['what']} (`{' '.join(r['options'])}`"
              f"{''.join(f' {k}={v}' for k, v in r['env'].items())})" for r in results]
    lines += ["", "Mean seconds per training message (one device's part of one exchange), phase by phase, "
              "then the ServerApp's view:", "",
              "| where the time goes | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in PHASES:
        lines.append(f"| {label} | " + " | ".join(_f(r["phases"][key]) for r in results) + " |")
    rows = [("**a message: push to reply pulled**", "message_total"),
            ("**training exchange, mean of all rounds** (`timing.csv` `exchange_s`)", "exchange_s"),
            ("training exchange, round 1 / later rounds", None),
            ("training exchange, first push to last reply (timeline)", "exchange_timeline"),
            ("validation (`validate_s`)", "validate_s"), ("a whole round (`round_s`)", "round_s"),
            ("the whole deployment, start to stop (wall s)", "wall_s")]
    for label, key in rows:
        if key is None:
            cells = [f"{_f(r['exchange_s_round1'])} / {_f(r['exchange_s_later'])}" for r in results]
        else:
            cells = [_f(r[key]) for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| round-1 `model_digest` | " + " | ".join(f"`{r['digest_round1']}`" for r in results) + " |")
    if costs:
        lines += ["", f"In a fresh process here, `import torch` took {costs['torch']:.2f} s, importing the ClientApp "
                  f"module (torch, Flower, pandas, fedkd) {costs['clientapp_module']:.2f} s, and torch's first "
                  f"optimiser step afterwards {costs['first_step']:.2f} s (it loads torch._dynamo and sympy): "
                  "what a process per message pays for every message, and the worker once."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m simulations.deploy_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes (= edge clients)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per deployment")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="what to compare, in this order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/deploy-bench"), help="results folder")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/fedkd"), help="teacher cache (shared by variants)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a deployment may take")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "devices.md", help="page whose block to fill")
    p.add_argument("--no-doc", action="store_true", help="only print and write --out")
    p.add_argument("--no-import-costs", action="store_true", help="skip timing the imports in a fresh process")
    args = p.parse_args(argv)
    args.argv = argv
    args.out, args.cache_dir = args.out.resolve(), args.cache_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(args, name) for name in args.variants]
    costs = None if args.no_import_costs else import_costs()
    text = render(results, costs, args)
    (args.out / "bench.json").write_text(json.dumps({"results": results, "import_costs": costs}, indent=1))
    (args.out / "bench.md").write_text(text + "\n")
    print(text)
    digests = {r["digest_round1"] for r in results}
    if len(digests) != 1:
        print(f"[deploy-bench] ERROR: the variants gave different round-1 models: {sorted(digests)}", file=sys.stderr)
        return 1
    if not args.no_doc:
        splice(args.doc, SECTION, text)
        print(f"written: {args.doc} (block {SECTION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
