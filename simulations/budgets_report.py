"""Tables and plots of docs/budgets.md from a finished ``fedkd sweep simulations/sweeps/budgets.toml``.

    python -m simulations.budgets_report outputs/sweeps/budgets --target 0.03

Per run: the NDCG@10 of the model each device runs (its own width), of the full global
student on every user, per device tier, participation and stragglers per tier, simulated
time, and simulated time until validation NDCG@10 first reaches ``--target``. Runs whose
name starts with ``deadline-`` (plus ``nested``, whose deadline is the base one) make the
deadline sweep plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedkd.plots import plt, save_figure
from fedkd.stats import paired_bootstrap
from simulations import ROOT
from simulations.runs import Run, load_runs, split_seed


def load(folder: Path) -> dict[str, Run]:
    """Finished runs by name."""
    return {run.name: run for run in load_runs(folder) if run.finished}


def time_to_target(rows: list[dict], target: float) -> float | None:
    """Simulated seconds until validation NDCG@10 first reaches the target (None: never)."""
    for r in rows:
        if r["val_ndcg"] not in ("", None) and float(r["val_ndcg"]) >= target:
            return float(r["sim_time_s"])
    return None


def fleet_table(runs: dict[str, Run], target: float) -> str:
    first = next(iter(runs.values()))
    tiers = [t.strip() for t in first.config["tier-names"].split(",")]  # the config's order, weakest first
    head = (["run", "deadline s", "widths", "NDCG@10 (own model)", "NDCG@10 (full student)"]
            + [f"{t} NDCG@10" for t in tiers] + [f"{t} part./aggr./strag." for t in tiers]
            + ["sim time s", f"sim s to NDCG {target:g}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in runs.items():
        s, c = run.summary, run.config
        tt = time_to_target(run.rows, target)
        cells = [name, f"{c['round-deadline']:g}", c["student-widths"] or str(c["student-dim"]),
                 f"{s['test_ndcg@10']:.4f}", f"{s.get('test_ndcg@10_full_width', s['test_ndcg@10']):.4f}"]
        cells += [f"{s['tiers'][t]['test_ndcg@10']:.4f}" for t in tiers]
        cells += [f"{s['tiers'][t]['participants']}/{s['tiers'][t]['aggregated']}/{s['tiers'][t]['stragglers']}"
                  for t in tiers]
        cells += [f"{s['sim_time_s']:.1f}", "never" if tt is None else f"{tt:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# (label, run, its per-client file, reference run): every row compares the same users of one tier.
COMPARISONS = [
    ("nested, full student vs drop-weak", "nested", "test_per_client_full_width.csv", "drop-weak"),
    ("nested, own width vs drop-weak", "nested", "test_per_client.csv", "drop-weak"),
    ("nested vs all-strong", "nested", "test_per_client.csv", "all-strong"),
    ("drop-weak vs all-strong", "drop-weak", "test_per_client.csv", "all-strong"),
]


def comparison_table(runs: dict[str, Run]) -> str:
    """Per tier, the paired difference in test NDCG@10 between two runs on that tier's users,
    pooled over every seed at which both ran, with a 95% bootstrap interval over users
    (stratified by seed) and the relative difference.

    Pairing is what makes few seeds informative here: both runs score the same users with
    the same held-out items, so user-to-user variance cancels."""
    first = next(iter(runs.values()))
    tiers = [t.strip() for t in first.config["tier-names"].split(",")]
    seeds = sorted({seed for n in runs if (seed := split_seed(n)[1]) is not None})
    lines = ["| comparison | tier | seeds | users x seeds | NDCG@10 | reference | difference, 95% CI | relative |",
             "|---|---|---|---|---|---|---|---|"]
    for label, name, file, ref in COMPARISONS:
        pairs = [(s, runs[f"{name}-s{s}"].per_user(file), runs[f"{ref}-s{s}"].per_user())
                 for s in seeds if f"{name}-s{s}" in runs and f"{ref}-s{s}" in runs
                 and (runs[f"{name}-s{s}"].path / file).is_file()]
        if not pairs:
            continue
        for t, tier in enumerate(tiers):
            x, y, strata = [], [], []
            for s, a, b in pairs:
                users = sorted(u for u in a if a[u][0] == t and u in b)
                x += [a[u][1] for u in users]
                y += [b[u][1] for u in users]
                strata += [s] * len(users)
            if not x:
                continue
            x, y = np.array(x), np.array(y)
            m, lo, hi = paired_bootstrap(x, y, strata=np.array(strata))
            rel = f"{m / y.mean():+.0%}" if y.mean() > 0 else "n/a"
            lines.append(f"| {label} | {tier} | {','.join(str(p[0]) for p in pairs)} | {len(x)} | {x.mean():.4f} | "
                         f"{y.mean():.4f} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | {rel} |")
    return "\n".join(lines) + "\n"


def mean_steps(rows: list[dict], tier: str) -> float:
    """Mean local steps of a tier's aggregated devices over the rounds (0 where none trained)."""
    vals = [float(r[f"steps_mean_{tier}"]) for r in rows if r.get(f"steps_mean_{tier}") not in ("", "nan", None)]
    vals = [v for v in vals if v == v]
    return sum(vals) / len(rows) if rows else 0.0


def deadline_points(runs: dict[str, Run]) -> list[dict]:
    """The deadline sweep (uniform selection, mixed fleet): one point per deadline."""
    points = []
    for name, r in runs.items():
        if not (name.startswith("deadline-") or name.startswith("nested-")) or r.config["selection"] != "uniform":
            continue
        tiers = [t.strip() for t in r.config["tier-names"].split(",")]
        s = r.summary
        points.append({"deadline": r.config["round-deadline"], "ndcg": s["test_ndcg@10"],
                       "ndcg_full": s.get("test_ndcg@10_full_width", s["test_ndcg@10"]),
                       "stragglers": s["stragglers_total"], "weakest": tiers[0],
                       "weak_steps": mean_steps(r.rows, tiers[0]), "run": name})
    return sorted(points, key=lambda p: (p["deadline"], p["run"]))


def deadline_plot(runs: dict[str, Run], out: Path) -> list[dict]:
    """Final test NDCG@10, stragglers and the weakest tier's local steps against the deadline."""
    points = deadline_points(runs)
    if not points:
        return []
    xs = [p["deadline"] for p in points]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(xs, [p["ndcg"] for p in points], marker="o", label="each device's own-width model")
    ax.plot(xs, [p["ndcg_full"] for p in points], marker="^", label="full global student, every user")
    ax.set_ylabel("test NDCG@10")
    ax.legend(fontsize=8)
    bx.plot(xs, [p["stragglers"] for p in points], marker="s", color="C3", label="stragglers over the run")
    bx.set_ylabel("stragglers over the run", color="C3")
    bx2 = bx.twinx()
    bx2.plot(xs, [p["weak_steps"] for p in points], marker="d", color="C2")
    bx2.set_ylabel(f"mean local steps per round, {points[0]['weakest']} tier", color="C2")
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xticks(xs, [f"{x:g}" for x in xs])
        a.minorticks_off()
        a.set_xlabel("round deadline (simulated s, log scale)")
        a.grid(alpha=0.3)
    fig.suptitle("Deadline sweep: mixed fleet, nested widths, uniform selection")
    save_figure(fig, out)
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="Folder of the budgets sweep (outputs/sweeps/budgets).")
    p.add_argument("--target", type=float, default=0.03, help="Validation NDCG@10 for time-to-target.")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "budgets_deadline.png",
                   help="Where the deadline plot goes.")
    args = p.parse_args(argv)
    runs = load(args.sweep)
    if not runs:
        print(f"{args.sweep}: no finished runs", file=sys.stderr)
        return 1
    print(fleet_table(runs, args.target))
    print(comparison_table(runs))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    points = deadline_plot(runs, args.plot)
    if points:
        weak = points[0]["weakest"]
        print(f"| deadline s | test NDCG@10, own model | full student | stragglers | {weak} steps/round |\n"
              "|---|---|---|---|---|")
    for p in points:
        print(f"| {p['deadline']:g} | {p['ndcg']:.4f} | {p['ndcg_full']:.4f} | {p['stragglers']} | "
              f"{p['weak_steps']:.1f} |")
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
