"""The protocols table of docs/results.md, from a finished ``fedkd sweep simulations/sweeps/protocols.toml``.

    python -m simulations.protocols_table outputs/sweeps/protocols \
        --include outputs/sweeps/convergence:fedkd-c20=fedkd-frozen --include outputs/sweeps/convergence:fedavg-c20=fedavg

``--include`` takes a config's runs from another sweep that ran it with the same settings (the
protocols spec says which), under the name the table gives it, instead of running them twice
(:func:`simulations.report.include_runs`, shared with the privacy report).

Mean ± sd over seeds comes from :mod:`simulations.report` (the same numbers as the sweep's
report.md); on top, each protocol is compared with fedkd (frozen teacher) user by user: a
paired bootstrap over test users, stratified by seed, because every protocol is scored on
the same users and the per-seed spread hides how consistent a difference is.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from fedkd.stats import paired_bootstrap
from simulations import ROOT
from simulations.docsplice import splice
from simulations.report import aggregate, format_stat, include_runs, load_sweep
from simulations.runs import load_run

SECTION = "protocols"  # the block of --doc this table fills (simulations/docsplice.py)
WIRE = {  # what a training round sends, by protocol (docs/architecture.md#protocols)
    "params": "student down, quantised update up (+ proxy batch and soft labels down if kd > 0)",
    "logits": "proxy batch, targets and next batch ids down; top-k predictions up",
    "local": "a round config down, metrics up: no model, no labels",
    "proxy": "nothing: the server trains on the proxy set",
}


def build(folder: Path, reference: str = "fedkd-frozen", include: list[str] = (), section: str = SECTION) -> str:
    col = load_sweep(folder)
    col = dataclasses.replace(col, runs=include_runs(include) + col.runs)
    k_metrics = ["test_ndcg@10", "test_hr@10", "train_bytes_per_round", "bytes_up_total", "clients_trained"]
    rows = aggregate(col.runs, k_metrics)
    done = {r.name: r for r in col.runs if r.status == "finished"}
    ref_runs = {r.seed: r for r in done.values() if r.config == reference}
    where = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    extra = "".join(f" --include {spec}" for spec in include) + (f" --section {section}" if section != SECTION else "")
    lines = [f"Command: `fedkd sweep simulations/sweeps/protocols.toml --set data-path=<ml-100k>/u.data`, "
             f"then `python -m simulations.protocols_table {where}{extra}`.",
             "",
             f"| protocol (config) | what a round sends | seeds | test NDCG@10 | test HR@10 | MB per round | "
             f"MB up, whole run | clients trained | NDCG@10 vs {reference}, paired 95% CI |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = [r for r in done.values() if r.config == row.config]
        protocol = runs[0].summary.get("protocol", "params") if runs else "?"
        mb = row.stats["train_bytes_per_round"]
        up = row.stats["bytes_up_total"]
        lines.append(
            f"| {protocol} ({row.config}) | {WIRE.get(protocol, '')} | {row.done}/{row.expected} | "
            f"{format_stat(row.stats['test_ndcg@10'])} | {format_stat(row.stats['test_hr@10'])} | "
            f"{'' if mb is None else f'{mb.mean / 1e6:.2f}'} | {'' if up is None else f'{up.mean / 1e6:.1f}'} | "
            f"{format_stat(row.stats['clients_trained'])} | {_versus(runs, ref_runs, row.config == reference)} |")
    return "\n".join(lines) + "\n"


def _versus(runs, ref_runs, is_ref: bool) -> str:
    if is_ref:
        return "reference"
    pairs = [(r, ref_runs[r.seed]) for r in runs if r.seed in ref_runs]
    if not pairs:
        return "n/a"
    a, b, strata = [], [], []
    for i, (r, ref) in enumerate(pairs):
        x, y = load_run(r.dir).user_ndcg(), load_run(ref.dir).user_ndcg()
        ids = sorted(set(x) & set(y))
        a += [x[j] for j in ids]
        b += [y[j] for j in ids]
        strata += [i] * len(ids)
    m, lo, hi = paired_bootstrap(np.array(a), np.array(b), strata=np.array(strata))
    return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}] ({m / max(np.mean(b), 1e-12):+.0%})"


def write_into(doc: Path, table: str, section: str = SECTION) -> None:
    """Replace the ``section`` block of ``doc`` (a page without one gets it as a new section)."""
    splice(doc, section, table, heading="## Protocols on MovieLens-100K" if section == SECTION
           else f"## Protocols on MovieLens-100K ({section})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="Folder of the protocols sweep (outputs/sweeps/protocols).")
    p.add_argument("--reference", default="fedkd-frozen", help="Config every other one is compared with.")
    p.add_argument("--include", action="append", default=[], metavar="SWEEP:CONFIG=NAME",
                   help="Also show the finished runs of CONFIG from the sweep folder SWEEP, as config NAME "
                        "(one that ran with the same settings; repeatable).")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md",
                   help="Markdown file whose protocols section is replaced.")
    p.add_argument("--section", default=SECTION,
                   help="Name of the block of --doc to fill (<!-- NAME --> ... <!-- /NAME -->), e.g. to keep "
                        "an earlier table beside a new one while the new sweep runs.")
    args = p.parse_args(argv)
    table = build(args.sweep.resolve(), args.reference, args.include, args.section)
    print(table)
    write_into(args.doc, table, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
