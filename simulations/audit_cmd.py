"""``fedkd audit FOLDER``: what crossed the wire in a run (or in every run under a folder).

Reads each ``wire.jsonl`` (one line per message, written by the server) and prints, per
direction and message type, the message count, bytes and the array keys with dtypes and
shapes, config keys and metric keys. With ``--history`` and a run made with
``wire-payloads = true`` it also searches every saved payload for the private interaction
histories of the run's edge users (rebuilt from the run's config.json, as only the
experimenter can) and exits 1 if any run of ``--window`` consecutive private items is found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simulations.options import RawHelpFormatter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="Summarise a run's wire log (per direction x message type).",
                       description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("folder", type=Path, metavar="FOLDER",
                   help="A results folder with wire.jsonl, or any folder holding results folders (a sweep).")
    p.add_argument("--json", action="store_true", help="Print the summary as JSON instead of Markdown.")
    p.add_argument("--history", action="store_true",
                   help="Also search the saved payloads (wire/*.npz, from wire-payloads = true) for private histories.")
    p.add_argument("--window", type=int, default=6,
                   help="Consecutive private items that count as a history found (default: 6).")


def wire_logs(folder: Path) -> list[Path]:
    if (folder / "wire.jsonl").is_file():
        return [folder / "wire.jsonl"]
    return sorted(p for p in folder.rglob("wire.jsonl") if ".old-" not in str(p.parent))


def history_findings(run_dir: Path, *, window: int = 6) -> tuple[list[dict], int]:
    """Search the run's saved payloads for its edge users' training histories; returns the
    findings and the number of payload files searched."""
    import numpy as np

    from fedkd.audit import find_history
    from fedkd.config import ExperimentConfig
    from fedkd.population import population
    from simulations.runs import load_run

    dumps = sorted((run_dir / "wire").glob("*.npz"))
    if not dumps:
        raise ValueError(f"{run_dir}: no wire/*.npz payloads; run with --wire-payloads true to save them")
    cfg = ExperimentConfig.from_flat(load_run(run_dir).config)
    pop = population(cfg)
    seqs = pop.dataset.sequences
    private = {int(u): seqs[u] for c in pop.clients for u in c}  # the whole history: train, valid, test
    public = [seqs[u][:-2] for u in pop.cloud_users]  # what the cloud holds and may send (proxy prefixes)
    findings = []
    for f in dumps:
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        for hit in find_history(arrays, private, num_items=pop.dataset.num_items, public=public, window=window):
            findings.append({"file": f.name, **hit})
    return findings, len(dumps)


def main(args: argparse.Namespace) -> int:
    from fedkd.audit import format_summary, read_log, summarise

    logs = wire_logs(args.folder)
    if not logs:
        raise ValueError(f"{args.folder}: no wire.jsonl in it or below it")
    status = 0
    for path in logs:
        rows = summarise(read_log(path))
        out = {"run": str(path.parent), "summary": rows}
        if args.history:
            findings, n = history_findings(path.parent, window=args.window)
            out["history_check"] = {"payloads": n, "window": args.window, "findings": findings}
            status = max(status, 1 if findings else 0)
        if args.json:
            print(json.dumps(out, indent=2))
            continue
        print(f"## {path.parent}\n")
        print(format_summary(rows))
        if args.history:
            verdict = (f"FOUND {len(findings)} private runs, e.g. {findings[:3]}" if findings
                       else "no private history found")
            print(f"History check ({n} payloads, runs of {args.window} items): {verdict}\n")
    return status
