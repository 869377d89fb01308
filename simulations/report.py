"""Tables and plots over the seeds of a sweep: mean ± sample standard deviation per config.

    fedkd report outputs/sweeps/protocols
    fedkd report outputs/baselines --metrics test_ndcg@10 teacher.best_valid_ndcg

A sweep folder (written by ``fedkd sweep``) has ``sweep.json``, which says which runs were
planned, so the report can name the runs that are missing instead of silently averaging
fewer seeds. Any other folder of results folders works too: runs are grouped by their
name without its ``-s<seed>`` suffix, and every group is expected to cover every seed seen.

Writes into the folder: ``report.md``, ``report.csv`` (one row per run),
``report_summary.csv`` (mean, std, n per config and metric), ``curves_vs_round.png``,
``curves_vs_bytes.png`` and ``bars.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from simulations.options import RawHelpFormatter
from simulations.runs import Run, load_run, load_runs, split_seed

DEFAULT_METRICS = ("test_ndcg@10", "test_hr@10")
X_AXES = {"round": ("curves_vs_round.png", "round"),
          "cum_bytes": ("curves_vs_bytes.png", "cumulative training traffic (MB, up + down)")}


@dataclass(frozen=True)
class RunRecord:
    """One planned run; ``summary`` is None unless it finished with the config it was planned with."""

    name: str
    config: str
    seed: int | None
    dir: Path
    status: str  # finished | to run | stale
    summary: dict | None


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # None with one value: a spread of one seed means nothing
    n: int


@dataclass(frozen=True)
class ConfigRow:
    config: str
    done: int
    expected: int
    missing: list[str]
    stats: dict[str, Stat | None]  # None: no finished run has that metric


@dataclass(frozen=True)
class Collection:
    name: str
    metrics: list[str]
    runs: list[RunRecord]


# --- reading ----------------------------------------------------------------------------
def run_status(run: Run, expected: Mapping | None = None) -> str:
    """finished, to run (never started or interrupted: no summary.json) or stale (config differs).

    summary.json is written last, so its presence means the run ended; config.json says
    what it ran, so a finished run of an edited spec is not mistaken for a current one.
    """
    if not run.finished:
        return "to run"
    if expected is None:
        return "finished"
    try:
        stored = run.config
    except (OSError, ValueError, KeyError, TypeError):
        return "stale"
    return "finished" if same_config(stored, expected) else "stale"


def same_config(stored: Mapping, expected: Mapping) -> bool:
    """The same run's settings (:func:`fedkd.config.settings_differ`): a knob added to fedkd after
    a run finished, at the value that keeps the earlier behaviour, or a changed default the run
    never used, must not force the run to be redone; any other difference does (``stored`` is
    the finished run's config.json, ``expected`` the plan)."""
    from fedkd.config import settings_differ

    return not settings_differ(stored, expected)


def load_sweep(folder: Path) -> Collection:
    """The runs of a sweep folder (from sweep.json), or of any folder of results folders."""
    spec_file = folder / "sweep.json"
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text())
        order = {c: i for i, c in enumerate(dict.fromkeys(r["config"] for r in spec["runs"]))}
        planned = sorted(spec["runs"], key=lambda r: order[r["config"]])  # a config's seeds together
        runs = [_record(r["name"], r["config"], r["seed"], folder / "runs" / r["name"], r.get("resolved"))
                for r in planned]
        return Collection(spec["name"], list(spec.get("metrics") or DEFAULT_METRICS), runs)
    return Collection(folder.name, list(DEFAULT_METRICS), _scan(folder))


def include_runs(specs: Sequence[str]) -> list[RunRecord]:
    """The runs named by ``SWEEP:CONFIG=NAME`` specs (``--include``), their config renamed NAME.

    A table may need a config that another sweep already ran with the same settings (the
    convergence sweep's fedkd-c20 is the protocols table's fedkd-frozen and the private fleet's
    "no protection"): borrowing its runs saves running them twice. The spec must name a config
    the sweep has, so that a typo fails here instead of silently dropping a row.
    """
    runs = []
    for spec in specs:
        try:
            where, rename = spec.rsplit(":", 1)
            config, name = rename.split("=", 1)
            if not (where and config and name):
                raise ValueError
        except ValueError:
            raise SystemExit(f"--include {spec!r}: expected SWEEP_FOLDER:CONFIG=NAME, e.g. "
                             "outputs/sweeps/convergence:fedkd-c20=fedkd-frozen") from None
        try:
            found = [r for r in load_sweep(Path(where)).runs if r.config == config]
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--include {spec!r}: cannot read the sweep in {where} ({exc})") from None
        if not found:
            raise SystemExit(f"--include {spec!r}: the sweep in {where} has no runs of config {config!r}")
        runs += [replace(r, config=name, name=r.name.replace(config, name, 1)) for r in found]
    return runs


def _record(name: str, config: str, seed: int | None, run_dir: Path, expected: Mapping | None) -> RunRecord:
    run = load_run(run_dir)
    status = run_status(run, expected)
    return RunRecord(name, config, seed, run_dir, status, run.summary if status == "finished" else None)


def _scan(folder: Path) -> list[RunRecord]:
    """The results folders of ``folder`` (:func:`simulations.runs.load_runs`); every group is
    expected at every seed seen."""
    dirs = [run.path for run in load_runs(folder)]
    if not dirs:
        raise ValueError(f"{folder}: no sweep.json and no results folders (with config.json) in it")
    found: dict[str, dict[int | None, Path]] = {}
    for d in dirs:
        config, seed = split_seed(d.name)
        found.setdefault(config, {})[seed] = d
    all_seeds = sorted({s for by_seed in found.values() for s in by_seed if s is not None})
    runs = []
    for config, by_seed in found.items():
        seeds = all_seeds if any(s is not None for s in by_seed) else [None]
        for seed in seeds:
            name = config if seed is None else f"{config}-s{seed}"
            runs.append(_record(name, config, seed, by_seed.get(seed, dirs[0].parent / name), None))
    return runs


def lookup(summary: Mapping, key: str) -> float | None:
    """A summary value by key, or by a dotted path into nested objects (``teacher.best_epoch``)."""
    value: object = summary.get(key)
    if value is None and "." in key:
        value = summary
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# --- aggregating ------------------------------------------------------------------------
def aggregate(runs: Sequence[RunRecord], metrics: Sequence[str]) -> list[ConfigRow]:
    """One row per config (in first-seen order): seeds done, and mean/std/n of each metric."""
    rows = []
    for config in dict.fromkeys(r.config for r in runs):
        group = [r for r in runs if r.config == config]
        done = [r for r in group if r.summary is not None]
        stats = {m: _stat([v for r in done if (v := lookup(r.summary, m)) is not None]) for m in metrics}
        rows.append(ConfigRow(config, len(done), len(group),
                              [r.name for r in group if r.summary is None], stats))
    return rows


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return Stat(float(np.mean(values)), std, len(values))


def format_stat(stat: Stat | None) -> str:
    """``mean ± std`` with as many decimals as the magnitude needs; ``n/a`` for what is unknown."""
    if stat is None:
        return "n/a"
    spec = _number_format(stat.mean)
    std = "n/a" if stat.std is None else format(stat.std, spec)
    return f"{format(stat.mean, spec)} ± {std}"


def _number_format(x: float) -> str:
    return ",.0f" if abs(x) >= 1000 else ".2f" if abs(x) >= 10 else ".4f"


def markdown_table(rows: Sequence[ConfigRow], metrics: Sequence[str]) -> str:
    lines = ["| config | seeds done | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for r in rows:
        cells = [format_stat(r.stats[m]) for m in metrics]
        lines.append(f"| {r.config} | {r.done}/{r.expected} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- curves -----------------------------------------------------------------------------
def curves(runs: Sequence[RunRecord], curve: str, x: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Per config: (x, mean, std) of ``curve`` over seeds, on rounds every finished seed has.

    Rounds without validation have an empty cell and are left out. ``cum_bytes`` is shown
    in MB and averaged over seeds at each round, since seeds may send slightly different bytes.
    """
    out = {}
    for config in dict.fromkeys(r.config for r in runs):
        per_seed = [_points(load_run(r.dir).rows, curve, x) for r in runs
                    if r.config == config and r.summary is not None]
        per_seed = [p for p in per_seed if p]
        if not per_seed:
            continue
        rounds = sorted(set.intersection(*(set(p) for p in per_seed)))
        if not rounds:
            continue
        xs = np.array([[p[t][0] for p in per_seed] for t in rounds]).mean(axis=1)
        ys = np.array([[p[t][1] for p in per_seed] for t in rounds])
        std = ys.std(axis=1, ddof=1) if ys.shape[1] > 1 else np.zeros(len(rounds))
        out[config] = (xs, ys.mean(axis=1), std)
    return out


def _points(rows: Sequence[Mapping], curve: str, x: str) -> dict[float, tuple[float, float]]:
    points = {}
    for row in rows:
        y = row.get(curve)
        if isinstance(y, float) and not math.isnan(y):
            xv = row["cum_bytes"] / 1e6 if x == "cum_bytes" else row["round"]
            points[row["round"]] = (xv, y)
    return points


def _plot_curves(data: dict, path: Path, *, curve: str, xlabel: str, title: str) -> None:
    from fedkd.plots import plt, save_figure  # here: `fedkd run` need not import matplotlib
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, (xs, mean, std) in data.items():
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=config)
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{curve} (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def _plot_bars(rows: Sequence[ConfigRow], metric: str, path: Path, *, title: str) -> None:
    from fedkd.plots import plt, save_figure  # here: `fedkd run` need not import matplotlib
    shown = [r for r in rows if r.stats[metric] is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(shown) + 2), 4.5))
    ax.bar(range(len(shown)), [r.stats[metric].mean for r in shown],
           yerr=[r.stats[metric].std or 0.0 for r in shown], capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(shown)), [f"{r.config}\n(n={r.stats[metric].n})" for r in shown],
                  rotation=30, ha="right", fontsize="small")
    ax.set_title(title)
    ax.set_ylabel(f"{metric} (mean ± sd over seeds)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


# --- writing ----------------------------------------------------------------------------
def write_report(folder: Path, *, metrics: Sequence[str] | None = None, curve: str = "val_ndcg",
                 x_axes: Sequence[str] = tuple(X_AXES), command: str | None = None) -> list[Path]:
    """Write report.md, report.csv, report_summary.csv and the plots; return the files written."""
    col = load_sweep(folder)
    metrics = list(metrics or col.metrics)
    rows = aggregate(col.runs, metrics)
    written = [_write_runs_csv(folder / "report.csv", col.runs, metrics),
               _write_summary_csv(folder / "report_summary.csv", rows, metrics)]
    plots = []
    for x in x_axes:
        data = curves(col.runs, curve, x)
        if data:
            file, xlabel = X_AXES[x]
            _plot_curves(data, folder / file, curve=curve, xlabel=xlabel, title=col.name)
            plots.append(folder / file)
    if any(r.stats[metrics[0]] is not None for r in rows):
        _plot_bars(rows, metrics[0], folder / "bars.png", title=col.name)
        plots.append(folder / "bars.png")
    md = folder / "report.md"
    md.write_text(_markdown(col, rows, metrics, curve, plots, command))
    return [md, *written, *plots]


def _markdown(col: Collection, rows: list[ConfigRow], metrics: list[str], curve: str,
              plots: list[Path], command: str | None) -> str:
    done = sum(r.done for r in rows)
    lines = [f"# Sweep `{col.name}`", ""]
    if command:
        lines += [f"Produced by: `{command}`", ""]
    lines += [f"{done}/{len(col.runs)} runs finished. Mean ± sample standard deviation (ddof=1) over the "
              "finished seeds of each config; `n/a` where a config has one seed or lacks the metric.", "",
              markdown_table(rows, metrics), ""]
    absent = [m for m in metrics if all(r.stats[m] is None for r in rows)]
    if absent and done:
        keys = sorted(next(r.summary for r in col.runs if r.summary is not None))
        lines += [f"Not in any summary: {', '.join(absent)} (summary keys: {', '.join(keys)}).", ""]
    missing = [(r.name, r.status) for r in col.runs if r.summary is None]
    if missing:
        reasons = {"to run": "not finished", "stale": "stale: config differs from the sweep's"}
        lines += ["Missing runs: " + ", ".join(f"`{n}` ({reasons[s]})" for n, s in missing) + ".", ""]
    else:
        lines += ["Missing runs: none.", ""]
    lines += ["## Per run", "", "| config | seed | run | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 3) + "|"]
    for r in col.runs:
        cells = [_cell(r, m) for m in metrics]
        lines.append(f"| {r.config} | {'' if r.seed is None else r.seed} | {r.name} | " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Plots", "", f"Curves: `{curve}` per config, mean over seeds with a ±1 sd band.", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _cell(run: RunRecord, metric: str) -> str:
    if run.summary is None:
        return "missing"
    v = lookup(run.summary, metric)
    return "n/a" if v is None else format(v, _number_format(v))


def _write_runs_csv(path: Path, runs: Sequence[RunRecord], metrics: Sequence[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "seed", "run", "status", *metrics])
        for r in runs:
            values = [lookup(r.summary, m) if r.summary else None for m in metrics]
            w.writerow([r.config, r.seed, r.name, r.status, *("" if v is None else repr(v) for v in values)])
    return path


def _write_summary_csv(path: Path, rows: Sequence[ConfigRow], metrics: Sequence[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "metric", "mean", "std", "n", "seeds_done", "seeds_expected"])
        for r in rows:
            for m in metrics:
                s = r.stats[m]
                w.writerow([r.config, m, "" if s is None else repr(s.mean),
                            "" if s is None or s.std is None else repr(s.std), 0 if s is None else s.n,
                            r.done, r.expected])
    return path


# --- command line -----------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Tables and plots over the seeds of a sweep (or any folder of runs).",
                       description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("folder", type=Path, metavar="SWEEP_DIR",
                   help="A sweep folder (with sweep.json) or a folder of results folders.")
    p.add_argument("--metrics", nargs="+", default=None, metavar="KEY",
                   help="summary.json keys to tabulate; dots reach into nested ones (teacher.best_epoch). "
                        "Default: the sweep's metrics, else " + ", ".join(DEFAULT_METRICS) + ".")
    p.add_argument("--curve", default="val_ndcg", metavar="COLUMN",
                   help="metrics.csv column drawn in the curves (default: val_ndcg).")
    p.add_argument("--x", choices=[*X_AXES, "both"], default="both",
                   help="x axis of the curves: round, cum_bytes, or both plots (default: both).")


def main(args: argparse.Namespace, command: str) -> int:
    if not args.folder.is_dir():
        raise ValueError(f"{args.folder}: no such folder")
    x_axes = list(X_AXES) if args.x == "both" else [args.x]
    paths = write_report(args.folder, metrics=args.metrics, curve=args.curve, x_axes=x_axes, command=command)
    print(paths[0].read_text())
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0
