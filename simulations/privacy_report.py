"""The privacy/utility table and plot of docs/privacy.md, from a finished privacy sweep.

    python -m simulations.privacy_report outputs/sweeps/privacy [--out docs/privacy.md --img docs/img]

Per configuration (mean ± sd over seeds, from :mod:`simulations.report`): the epsilon the
accountant reports at the end (``dp_epsilon``; ``inf`` for clipping without noise, ``off``
for the run without DP), the noise multiplier used, test NDCG@10 and HR@10 and the
membership-inference AUC. The plot has two panels against epsilon (log scale, ``inf`` drawn
at the right edge): test NDCG@10 and attack AUC, with the no-DP run as a dashed line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from simulations.docsplice import SpliceError, markers, splice
from simulations.report import aggregate, format_stat, load_sweep

SECTION = "privacy"  # the block of --out this report writes (simulations/docsplice.py)
METRICS = ["test_ndcg@10", "test_hr@10", "mia_auc", "dp_epsilon", "privacy.noise_multiplier"]


def _epsilon(runs) -> float | None:
    """A config's epsilon: None without DP, inf without noise, else the mean reported."""
    vals = []
    for r in runs:
        if r.summary is None:
            continue
        if "privacy" not in r.summary:
            return None
        e = r.summary.get("dp_epsilon")
        vals.append(math.inf if e == "inf" else float(e))
    return sum(vals) / len(vals) if vals else None


def table(folder: Path) -> tuple[str, list[dict]]:
    col = load_sweep(folder)
    rows = aggregate(col.runs, METRICS)
    points = []
    lines = ["| config | seeds | epsilon (delta 1e-5) | noise multiplier | test NDCG@10 | test HR@10 | attack AUC |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        eps = _epsilon([r for r in col.runs if r.config == row.config])
        z = row.stats.get("privacy.noise_multiplier")
        eps_text = ("-" if not row.done else "off (no DP)" if eps is None else "inf" if math.isinf(eps)
                    else f"{eps:.3g}")
        lines.append(f"| {row.config} | {row.done}/{row.expected} | {eps_text} | {format_stat(z) if z else '-'} | "
                     f"{format_stat(row.stats['test_ndcg@10'])} | {format_stat(row.stats['test_hr@10'])} | "
                     f"{format_stat(row.stats['mia_auc'])} |")
        if row.done:
            points.append({"config": row.config, "epsilon": eps, "ndcg": row.stats["test_ndcg@10"],
                           "auc": row.stats["mia_auc"]})
    return "\n".join(lines) + "\n", points


def plot(points: list[dict], path: Path, title: str) -> Path:
    from fedkd.plots import plt, save_figure  # here: importing this module stays cheap

    dp = [p for p in points if p["epsilon"] is not None]
    finite = [p["epsilon"] for p in dp if math.isfinite(p["epsilon"])]
    inf_x = (max(finite) * 2.5) if finite else 10.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ndcg", "test NDCG@10 (full ranking)"),
                           (axes[1], "auc", "membership-inference AUC (loss threshold)")):
        pts = sorted(((p["epsilon"] if math.isfinite(p["epsilon"]) else inf_x, p[key]) for p in dp if p[key]),
                     key=lambda t: t[0])
        if pts:
            ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[s.std or 0 for _, s in pts],
                        marker="o", capsize=3, label="DP (central)")
        # Every configuration without DP is a reference line: no-dp (what DP costs) and, where the sweep
        # has it, proxy-only (a student that never saw an edge user: the attack's "nothing revealed").
        for p, style in zip((p for p in points if p["epsilon"] is None and p[key]),
                            (("--", "grey"), ("-.", "tab:green"), (":", "tab:red"))):
            ax.axhline(p[key].mean, ls=style[0], color=style[1], label=p["config"])
        if key == "auc":
            ax.axhline(0.5, ls=":", color="black", lw=0.8)
        ax.set_xscale("log")
        ticks = sorted(set(finite)) + ([inf_x] if any(math.isinf(p["epsilon"]) for p in dp) else [])
        ax.set_xticks(ticks, [f"{t:.3g}" for t in sorted(set(finite))] + (["inf"] if len(ticks) > len(set(finite)) else []))
        ax.minorticks_off()
        ax.set_xlabel("epsilon at delta = 1e-5")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="The sweep folder (outputs/sweeps/privacy) or any folder of runs.")
    p.add_argument("--out", type=Path, default=None,
                   help=f"Markdown file whose {' ... '.join(markers(SECTION))} block gets the table "
                        "(default: print it).")
    p.add_argument("--img", type=Path, default=None,
                   help="The plot's file (default: FOLDER/privacy_vs_epsilon.png).")
    args = p.parse_args(argv)
    text, points = table(args.folder)
    img = plot(points, args.img or args.folder / "privacy_vs_epsilon.png", f"privacy sweep: {args.folder.name}")
    print(text)
    print(f"plot: {img}")
    if args.out:
        link = os.path.relpath(img.resolve(), args.out.resolve().parent)
        try:
            splice(args.out, SECTION, f"Command: `python -m simulations.privacy_report {args.folder} --out {args.out}`"
                                      f"\n\n{text}\n![NDCG@10 and attack AUC vs epsilon]({link})\n")
        except SpliceError as exc:
            print(f"{exc}; table not written", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
