"""Print a markdown table comparing finished runs (one results folder each).

    python -m simulations.compare outputs/bits8 outputs/bits32

Ratios are against the first folder given, so they come from runs made on one machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulations.runs import load_run


def table(dirs: list[Path]) -> str:
    rows = []
    for d in dirs:
        run = load_run(d)
        s, c = run.summary, run.config
        k = c["eval-k"]
        rows.append((d.name, c["quant-bits"], c["soft-label-bits"], s["train_bytes_per_round"] / 1e3,
                     s["bytes_down_total"] / s["rounds"] / 1e3, s["bytes_up_total"] / s["rounds"] / 1e3,
                     s[f"test_hr@{k}"], s[f"test_ndcg@{k}"], s["wall_seconds"]))
    base = rows[0]
    out = ["| run | model bits | soft-label bits | kB/round (up+down) | kB down | kB up | bytes vs first | "
           "test HR@10 | test NDCG@10 | NDCG vs first | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:,.0f} | {r[4]:,.0f} | {r[5]:,.0f} | {r[3] / base[3]:.1%} | "
                   f"{r[6]:.4f} | {r[7]:.4f} | {(r[7] - base[7]) / base[7]:+.1%} | {r[8]:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="Results folders (each with summary.json, config.json).")
    args = p.parse_args(argv)
    print(table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
