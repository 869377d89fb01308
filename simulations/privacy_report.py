"""The privacy/utility table and plot of docs/privacy.md, from a finished privacy sweep.

    python -m simulations.privacy_report outputs/sweeps/privacy --out docs/privacy.md --img docs/img/privacy_vs_epsilon.png
    python -m simulations.privacy_report outputs/sweeps/private-fleet \\
        --include outputs/sweeps/convergence:fedkd-c20=no-protection \\
        --out docs/privacy.md --img docs/img/private_fleet.png

A privacy guarantee is only worth its price next to what it buys, so each configuration
shows both sides, mean ± sd over seeds (:mod:`simulations.report`): the cost (test NDCG@10
and HR@10) and what the two attacks still get (the membership-inference AUC and the history
reconstruction's precision@|H|). The DP mode (central, distributed, local) says whom the
guarantee trusts, and "+ SecAgg" that the server saw only each round's sum, which is also all
the reconstruction attack saw in those runs. Epsilon is what the accountant reports at the end
(``dp_epsilon``), not the target: ``inf`` for clipping without noise, ``off`` without DP.

``--include`` borrows a config another sweep already ran with the same settings (the private
fleet's "no protection" is the convergence sweep's fedkd-c20) instead of running it twice.

The plot draws the panels against epsilon (log scale, ``inf`` at the right edge), one series
per DP mode, so that modes are compared at equal epsilon; configurations without DP are
horizontal reference lines, the levels a private fleet is measured against.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from simulations.docsplice import SpliceError, markers, splice
from simulations.report import RunRecord, Stat, aggregate, format_stat, include_runs, load_sweep, lookup
from simulations.runs import load_run

SECTION = "privacy"  # the block of --out this report writes (simulations/docsplice.py)
RECON = "reconstruction_attack.precision@k"  # precision@|H|: k is each attacked history's size
RECON_BASE = ("reconstruction_attack.popularity_precision@k", "reconstruction_attack.random_precision@k")
METRICS = ["test_ndcg@10", "test_hr@10", "mia_auc", RECON, *RECON_BASE, "dp_epsilon", "privacy.noise_multiplier"]
PANELS = (("ndcg", "test NDCG@10 (full ranking)"),
          ("auc", "membership-inference AUC (loss threshold)"),
          ("recon", "history reconstruction, precision@|H| placed\nbetween its baselines (linear in each stretch)"))
# What a private student must beat, from the runs' own summaries: the frozen teacher the server
# holds before any device trains, and the most popular items.
REFERENCES = (("teacher (no device data)", "references.teacher.test_ndcg"),
              ("popularity", "references.popularity.test_ndcg"))
MODES = {"central": ("tab:blue", "o"), "distributed": ("tab:orange", "s"), "local": ("tab:purple", "^")}
EPSILON_TOLERANCE = 0.1  # paired(): "the same epsilon" within 10% (local DP lands below its target)
REFERENCE_STYLES = (("--", "grey"), ("-.", "tab:green"), (":", "tab:red"), ("--", "tab:brown"),
                    ("-.", "tab:olive"), (":", "tab:cyan"))


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


def _mode(runs) -> tuple[str, bool]:
    """A config's (dp-mode, secure-aggregation), from the config.json of its runs (finished ones
    first); a config.json without dp-mode falls back to what the summary's accountant says."""
    for r in sorted(runs, key=lambda r: r.summary is None):
        try:
            cfg = load_run(r.dir).config
        except (OSError, ValueError, KeyError, TypeError):
            continue
        summary_mode = ((r.summary or {}).get("privacy") or {}).get("mode")
        return str(cfg.get("dp-mode") or summary_mode or "off"), cfg.get("secure-aggregation") is True
    return "-", False


def table(folder: Path, include: Sequence[str] = ()) -> tuple[str, list[dict]]:
    """The markdown table, and one point per finished config for :func:`plot`."""
    col = load_sweep(folder)
    runs = include_runs(include) + col.runs  # borrowed references first: the rows read top-down from them
    rows = aggregate(runs, METRICS)
    points = []
    lines = ["| config | DP mode | seeds | epsilon (delta 1e-5) | noise multiplier | test NDCG@10 | test HR@10 | "
             "membership AUC | reconstruction precision@\\|H\\| (= recall@\\|H\\|) | "
             "its baselines: popularity / chance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        group = [r for r in runs if r.config == row.config]
        eps = _epsilon(group)
        mode, secagg = _mode(group)
        z = row.stats.get("privacy.noise_multiplier")
        eps_text = ("-" if not row.done else "off (no DP)" if eps is None else "inf" if math.isinf(eps)
                    else f"{eps:.3g}")
        lines.append(f"| {row.config} | {mode}{' + SecAgg' if secagg else ''} | {row.done}/{row.expected} | "
                     f"{eps_text} | {format_stat(z) if z else '-'} | "
                     f"{format_stat(row.stats['test_ndcg@10'])} | {format_stat(row.stats['test_hr@10'])} | "
                     f"{format_stat(row.stats['mia_auc'])} | {format_stat(row.stats[RECON])} | "
                     f"{_baselines(row.stats)} |")
        if row.done:
            points.append({"config": row.config, "mode": mode, "secagg": secagg, "epsilon": eps,
                           "ndcg": row.stats["test_ndcg@10"], "auc": row.stats["mia_auc"],
                           "recon": _advantage(row.stats)})
    refs, counted = [], 0
    for name, key in REFERENCES:
        values = [v for r in runs if r.summary is not None and (v := lookup(r.summary, key)) is not None]
        if values:
            stat, counted = Stat(sum(values) / len(values), None, len(values)), max(counted, len(values))
            refs.append(f"{name} {format_stat(stat).split(' ')[0]}")
            points.append({"config": name, "mode": "-", "secagg": False, "epsilon": None, "ndcg": stat,
                           "auc": None, "recon": None})
    if refs:
        lines += ["", f"What a private student must beat, test NDCG@10 on the same edge users (mean over the "
                      f"{counted} finished runs' summaries): {', '.join(refs)}."]
    differences = paired(runs)
    return "\n".join(lines) + "\n" + (f"\n{differences}" if differences else ""), points


def paired(runs: Sequence[RunRecord], tolerance: float = EPSILON_TOLERANCE) -> str:
    """Paired differences in test NDCG@10, the cost of each guarantee with its uncertainty:
    every DP or SecAgg config against the one without protection, and distributed and local DP
    against the central DP config of the nearest epsilon within ``tolerance`` (relative): the
    price of trusting the server less for the same guarantee.

    Epsilons are those the accountants report, not the targets: without
    ``dp-local-participations`` local DP is calibrated for a device in every round but reports
    the most exposed device's participations, so its guarantee lands below its target, and it
    is compared where it lands.

    Why paired per test user within seeds: two configs of the same seed score the same users
    on the same split, so per-user differences remove the spread between users that a
    comparison of the two means ± sd would carry (:func:`fedkd.stats.paired_bootstrap`, as the
    convergence table does). Only seeds both configs finished are paired; a run without its
    ``test_per_client.csv`` is left out."""
    from fedkd.stats import paired_bootstrap  # here: importing this module stays cheap

    seeds: dict[str, dict[int, RunRecord]] = {}
    for r in runs:
        if r.summary is not None and r.seed is not None:
            seeds.setdefault(r.config, {})[r.seed] = r
    kind = {c: (*_mode(list(group.values())), _epsilon(group.values())) for c, group in seeds.items()}
    plain = next((c for c, (mode, secagg, _) in kind.items() if mode == "off" and not secagg), None)
    pairs = [(c, plain) for c in kind if plain is not None and c != plain]
    for c, (mode, _, eps) in kind.items():
        near = [(abs(math.log(e / eps)), central) for central, (m, _, e) in kind.items()
                if mode in ("distributed", "local") and m == "central" and eps and e and math.isfinite(e * eps)
                and abs(e / eps - 1) <= tolerance]
        if near:
            pairs.append((c, min(near)[1]))
    lines = []
    for a, b in pairs:
        xs, ys, strata, used = [], [], [], []
        for seed in sorted(set(seeds[a]) & set(seeds[b])):
            try:
                ua, ub = (load_run(seeds[c][seed].dir).user_ndcg() for c in (a, b))
            except OSError:
                continue
            users = sorted(set(ua) & set(ub))
            xs += [ua[u] for u in users]
            ys += [ub[u] for u in users]
            strata += [seed] * len(users)
            used.append(seed)
        if xs:
            d, lo, hi = paired_bootstrap(xs, ys, strata=strata)
            at = " vs ".join(_eps_text(kind[c][2]) for c in ((a, b) if kind[b][2] is not None else (a,)))
            lines.append(f"| {a} − {b} | {at} | {', '.join(map(str, used))} | {d:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
    if not lines:
        return ""
    return "\n".join(["Test NDCG@10 differences, paired per test user within each seed that both configs "
                      "finished, with a 95% bootstrap interval over those users (it holds the spread between "
                      "users, not between training runs: the seeds column says how many runs stand behind it). "
                      "Distributed and local DP are set against the central DP config of the nearest epsilon "
                      f"reported, within {tolerance:.0%}:", "",
                      "| comparison | epsilon | seeds | difference | 95% interval |", "|---|---|---|---|---|",
                      *lines]) + "\n"


def _eps_text(eps: float | None) -> str:
    return "off" if eps is None else "inf" if math.isinf(eps) else f"{eps:.3g}"


def _advantage(stats) -> Stat | None:
    """The reconstruction's precision on one scale for every config: 0 at chance (``k`` random
    items), 1 at popularity's guess (the most frequent items, no update looked at), 2 at a
    perfect guess, linear between each pair. Why not the raw precision: under secure aggregation
    the attacked unit is a round's sum, whose union of 150 histories chance already hits at 0.81
    and popularity at 0.91, against 0.06 and 0.33 for one client's history, so raw precisions of
    0.82 (a DP round sum, at chance) and 0.91 (one client's update under central DP, almost
    perfect) would read alike. On this scale "the noise brings the attack to chance" is 0 for
    every observer."""
    p, pop, chance = stats.get(RECON), stats.get(RECON_BASE[0]), stats.get(RECON_BASE[1])
    if p is None or pop is None or chance is None or not chance.mean < pop.mean < 1:
        return None
    lo, hi = (chance.mean, pop.mean) if p.mean < pop.mean else (pop.mean, 1.0)
    base = 0.0 if p.mean < pop.mean else 1.0
    scale = hi - lo
    return Stat(base + (p.mean - lo) / scale, None if p.std is None else p.std / scale, p.n)


def _baselines(stats) -> str:
    """The guesses the attack must beat (the most popular items; random items): without them a
    precision cannot be read, and chance differs between a client's update and a round's sum."""
    pop, chance = (stats.get(k) for k in RECON_BASE)
    return "n/a" if pop is None or chance is None else f"{pop.mean:.3f} / {chance.mean:.3f}"


def plot(points: list[dict], path: Path, title: str) -> Path:
    from fedkd.plots import plt, save_figure  # here: importing this module stays cheap

    dp = [p for p in points if p["epsilon"] is not None]
    finite = [p["epsilon"] for p in dp if math.isfinite(p["epsilon"])]
    inf_x = (max(finite) * 2.5) if finite else 10.0
    # a panel no run measured (the reconstruction attack in sweeps older than it) is left out
    panels = [(key, label) for key, label in PANELS if key == "ndcg" or any(p[key] for p in points)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    clusters: list[list[float]] = []  # epsilons within EPSILON_TOLERANCE share a tick (local DP lands near)
    for e in sorted(finite):
        if clusters and e <= clusters[-1][0] * (1 + EPSILON_TOLERANCE):
            clusters[-1].append(e)
        else:
            clusters.append([e])
    labels = {}  # tick label -> position
    for c in clusters:
        at = math.exp(sum(map(math.log, c)) / len(c))
        labels[f"{at:.2g}"] = at
    if any(math.isinf(p["epsilon"]) for p in dp):
        labels["inf"] = inf_x
    modes = [m for m in [*MODES, *sorted({p["mode"] for p in dp} - set(MODES))] if any(p["mode"] == m for p in dp)]
    # modes at the same epsilon sit side by side (a few % apart on the log axis), so that their
    # error bars do not hide one another
    dodge = {m: 1.04 ** (i - (len(modes) - 1) / 2) for i, m in enumerate(modes)}
    for ax, (key, label) in zip(axes[0], panels):
        for mode in modes:
            pts = sorted(((dodge[mode] * (p["epsilon"] if math.isfinite(p["epsilon"]) else inf_x), p[key])
                          for p in dp if p["mode"] == mode and p[key]), key=lambda t: t[0])
            if pts:
                color, marker = MODES.get(mode, (None, "o"))
                ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[s.std or 0 for _, s in pts],
                            marker=marker, color=color, capsize=3, label=f"{mode} DP")
        # Every configuration without DP is a reference line: no protection at all (what DP costs),
        # secure aggregation alone, and, where the sweep has it, proxy-only (a student that never saw
        # an edge user: the membership attack's "nothing revealed").
        refs = [p for p in points if p["epsilon"] is None and p[key]]
        for p, (ls, color) in zip(refs, itertools.cycle(REFERENCE_STYLES)):
            ax.axhline(p[key].mean, ls=ls, color=color, label=p["config"])
        if key == "auc":  # where the attack is no better than a coin
            ax.axhline(0.5, ls=":", color="black", lw=0.8)
        if key == "recon":  # the attack's scale: its two baselines and a perfect guess
            for y in (0.0, 1.0):
                ax.axhline(y, ls=":", color="black", lw=0.8)
            ax.set_yticks([0.0, 0.5, 1.0, 1.5, 2.0], ["chance", "", "popularity", "", "perfect"])
        ax.set_xscale("log")
        ax.set_xticks(list(labels.values()), list(labels))
        ax.minorticks_off()
        ax.set_xlabel("epsilon at delta = 1e-5")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="The sweep folder (outputs/sweeps/privacy) or any folder of runs.")
    p.add_argument("--include", action="append", default=[], metavar="SWEEP:CONFIG=NAME",
                   help="Also show the finished runs of CONFIG from the sweep folder SWEEP, as config NAME, "
                        "first (one that ran with the same settings; repeatable).")
    p.add_argument("--out", type=Path, default=None,
                   help=f"Markdown file whose {' ... '.join(markers(SECTION))} block (or --section's) gets "
                        "the table (default: print it).")
    p.add_argument("--section", default=SECTION,
                   help="Name of the block of --out to fill, so that each sweep keeps its own table "
                        "(private-fleet: <!-- private-fleet --> ... <!-- /private-fleet -->).")
    p.add_argument("--img", type=Path, default=None,
                   help="The plot's file (default: FOLDER/privacy_vs_epsilon.png).")
    args = p.parse_args(argv)
    text, points = table(args.folder, args.include)
    img = plot(points, args.img or args.folder / "privacy_vs_epsilon.png", f"privacy sweep: {args.folder.name}")
    print(text)
    print(f"plot: {img}")
    if args.out:
        link = os.path.relpath(img.resolve(), args.out.resolve().parent)
        command = " ".join(["python -m simulations.privacy_report", str(args.folder),
                            *(f"--include {spec}" for spec in args.include), f"--out {args.out}",
                            *([f"--section {args.section}"] if args.section != SECTION else []),
                            *([f"--img {args.img}"] if args.img else [])])
        try:
            splice(args.out, args.section, f"Command: `{command}`\n\n{text}\n"
                                      f"![NDCG@10 and the attacks vs epsilon]({link})\n")
        except SpliceError as exc:
            print(f"{exc}; table not written", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
