"""Tables and the plot of docs/communication.md from a finished communication sweep.

    fedkd sweep simulations/sweeps/communication.toml --set data-path=<ml-100k>/u.data
    python -m simulations.communication_report outputs/sweeps/communication

Writes the results section of ``--doc`` (between ``<!-- communication:results -->`` and
``<!-- /communication:results -->``) and one plot, ``--plot``: validation NDCG@10 against
cumulative training megabytes for every run. The tables:

1. **Bytes to target.** Target = the validation NDCG@10 that 32-bit FedAvg (``fedavg-32``)
   ends with, per seed; for every run, the cumulative training bytes (up + down, measured from
   the serialised messages) at the first evaluated round whose validation NDCG@10 reaches it,
   and that as a share of what ``fedavg-32`` itself needed.
2. **Error feedback.** Final test and validation NDCG@10 of 4-bit updates with and without
   error feedback, relative to 32-bit fedkd (``fedkd-32``) on the seeds both ran.
3. **Soft labels.** Soft-label bytes per round (``bytes_down_soft_labels``; proxy histories
   counted apart in ``bytes_down_proxy_inputs``) of the compressed runs against the naive
   float32 distributions (``fedkd-8-naive``), with final test and validation NDCG@10 relative
   to it on the seeds both ran.
Values are means over the seeds a config has finished; comparisons pair seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedkd.plots import plt, save_figure
from simulations import ROOT
from simulations.docsplice import splice
from simulations.runs import Run, load_runs, split_seed

SECTION = "communication:results"  # the block of --doc this report writes (simulations/docsplice.py)
REFERENCE, FULL_PRECISION = "fedavg-32", "fedkd-32"
EF_PAIR = ("fedkd-4-ef", "fedkd-4")
NAIVE, COMPRESSED = "fedkd-8-naive", ("fedkd-8", "fedkd-8-top40", "fedkd-8-cache", "fedkd-lean")


def load(folder: Path) -> dict[str, dict[int, Run]]:
    """Finished runs: config name -> seed -> run."""
    runs: dict[str, dict[int, Run]] = {}
    for run in load_runs(folder):
        config, seed = split_seed(run.name)
        if seed is not None and run.finished:
            runs.setdefault(config, {})[seed] = run
    order = _spec_order(folder / "sweep.json")
    return dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _spec_order(sweep_json: Path) -> list[str]:
    """Configs in the spec's order: that of the planned runs of the lowest seed. sweep.json's
    ``configs`` table is sorted by name, and its ``runs`` put runs kept from earlier commands
    (other seeds) first."""
    if not sweep_json.is_file():
        return []
    spec = json.loads(sweep_json.read_text())
    runs = spec.get("runs", [])
    first = min((r.get("seed", 0) for r in runs), default=0)
    planned = [r["config"] for r in runs if r.get("seed", 0) == first]
    return list(dict.fromkeys(planned + list(spec.get("configs", {}))))


def final_val(rows: Sequence[Mapping]) -> float:
    vals = [r["val_ndcg"] for r in rows if r["val_ndcg"] != ""]
    return float(vals[-1])


def bytes_to_target(rows: Sequence[Mapping], target: float) -> float | None:
    """Cumulative training bytes at the first evaluated round with validation NDCG@10 >= target."""
    for r in rows:
        if r["val_ndcg"] != "" and float(r["val_ndcg"]) >= target - 1e-12:
            return float(r["cum_bytes"])
    return None


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _test(run: Run) -> float:
    return float(run.summary["test_ndcg@10"])


def _val(run: Run) -> float:
    return final_val(run.rows)


def _paired(runs: Mapping[int, Run], base: Mapping[int, Run], value) -> str:
    """``runs`` relative to ``base`` over the seeds both have, with each seed's own ratio.

    A seed moves NDCG@10 by about 10% here, so a config's mean over seeds 0-2 against
    another's over seed 0 alone would mostly measure the seeds; pairing removes that.
    """
    if runs is base:
        return "reference"
    common = sorted(set(runs) & set(base))
    if not common:
        return "–"
    a, b = [value(runs[s]) for s in common], [value(base[s]) for s in common]
    pooled = f"{100 * (_mean(a) / _mean(b) - 1):+.1f}%"
    if len(common) == 1:
        return pooled + f" (seed {common[0]})"
    return pooled + " (" + ", ".join(f"{100 * (x / y - 1):+.0f}" for x, y in zip(a, b)) + ")"


def _describe(c: Mapping) -> str:
    """What a run sends, from its config."""
    if c["kd-weight"] == 0:
        labels = "no distillation"
    elif c["soft-label-format"] == "full":
        labels = "float32 full distributions"
    else:
        labels = f"top-{c['kd-top-k']} labels, {c['soft-label-bits']}-bit" + (", cached" if c["kd-cache"] else "")
    up = f"{c['quant-bits']}-bit" + (f" top-{c['update-density']:.0%}" if c["update-density"] < 1 else "")
    up += " + EF" if c["error-feedback"] else ""
    return f"{c['down-bits'] or c['quant-bits']}-bit student down, {up} updates up, {labels}"


def tables(runs: Mapping[str, Mapping[int, Run]]) -> str:
    out = []
    ref = runs.get(REFERENCE, {})
    # 1. bytes to the reference's final validation NDCG@10 ---------------------------------
    out.append("**Bytes to reach 32-bit FedAvg's final validation NDCG@10** (target per seed; "
               "MB = 10^6 bytes of training traffic, up + down)\n")
    out.append("| config | what crosses the wire | seeds | test NDCG@10 | MB per round | MB to target | "
               "% of FedAvg-32's MB to target |")
    out.append("|---|---|---|---|---|---|---|")
    for name, seeds in runs.items():
        mbs, shares, reached = [], [], 0
        for seed, run in seeds.items():
            if seed not in ref:
                continue
            target = final_val(ref[seed].rows)
            b, b_ref = bytes_to_target(run.rows, target), bytes_to_target(ref[seed].rows, target)
            if b is not None:
                reached += 1
                mbs.append(b / 1e6)
                shares.append(100 * b / b_ref)
        n_ref = sum(1 for s in seeds if s in ref)
        first = next(iter(seeds.values()))
        per_round = _mean([r.summary["train_bytes_per_round"] / 1e6 for r in seeds.values()])
        to_target = (f"{_mean(mbs):,.1f}" + (f" ({reached}/{n_ref} seeds reach it)" if reached < n_ref else "")
                     if mbs else ("never" if n_ref else "no FedAvg-32 run of its seeds"))
        share = f"{_mean(shares):.1f}%" if shares else "–"
        out.append(f"| {name} | {_describe(first.config)} | {len(seeds)} | "
                   f"{_mean([_test(r) for r in seeds.values()]):.4f} | {per_round:,.2f} | {to_target} | {share} |")
    # 2. error feedback --------------------------------------------------------------------
    out.append("\n**4-bit updates with and without error feedback**, final NDCG@10 relative to "
               f"`{FULL_PRECISION}` on the seeds both ran, per seed in brackets (goal: within 2% with error "
               "feedback)\n")
    out.append(f"| config | seeds | test NDCG@10 | test vs {FULL_PRECISION} | validation NDCG@10 | "
               f"validation vs {FULL_PRECISION} | MB up per round |")
    out.append("|---|---|---|---|---|---|---|")
    base = runs.get(FULL_PRECISION, {})
    for name in (FULL_PRECISION, *EF_PAIR, "fedkd-2-ef", "fedkd-topk-ef"):
        if name not in runs:
            continue
        up = _mean([r.summary["bytes_up_total"] / r.summary["rounds"] / 1e6 for r in runs[name].values()])
        out.append(f"| {name} | {len(runs[name])} | {_mean([_test(r) for r in runs[name].values()]):.4f} | "
                   f"{_paired(runs[name], base, _test)} | "
                   f"{_mean([_val(r) for r in runs[name].values()]):.4f} | {_paired(runs[name], base, _val)} | "
                   f"{up:.3f} |")
    # 3. soft labels -----------------------------------------------------------------------
    out.append("\n**Soft labels: compressed vs naive float32 distributions** (kB per round, all clients of "
               "the round; proxy histories are counted apart; NDCG@10 relative to the naive labels on the "
               "seeds both ran, per seed in brackets)\n")
    out.append("| config | seeds | soft-label kB per round | proxy-history kB per round | naive / this | "
               "test NDCG@10 | test vs naive | validation NDCG@10 | validation vs naive |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    naive = runs.get(NAIVE, {})

    def per_round(run, col):
        return _mean([r[col] for r in run.rows]) / 1e3

    naive_sl = _mean([per_round(r, "bytes_down_soft_labels") for r in naive.values()]) if naive else None
    for name in (NAIVE, *COMPRESSED):
        if name not in runs:
            continue
        sl = _mean([per_round(r, "bytes_down_soft_labels") for r in runs[name].values()])
        hist = _mean([per_round(r, "bytes_down_proxy_inputs") for r in runs[name].values()])
        ratio = f"{naive_sl / sl:,.0f}x" if naive_sl and sl else "–"
        out.append(f"| {name} | {len(runs[name])} | {sl:,.1f} | {hist:,.1f} | {ratio} | "
                   f"{_mean([_test(r) for r in runs[name].values()]):.4f} | {_paired(runs[name], naive, _test)} | "
                   f"{_mean([_val(r) for r in runs[name].values()]):.4f} | {_paired(runs[name], naive, _val)} |")
    return "\n".join(out) + "\n"


def plot(runs: Mapping[str, Mapping[int, Run]], path: Path) -> Path:
    """Validation NDCG@10 against cumulative training MB, every config (mean over seeds per
    evaluated round), with 32-bit FedAvg's final value as a dashed line."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, seeds) in enumerate(runs.items()):
        curves = [[(r["cum_bytes"] / 1e6, float(r["val_ndcg"])) for r in run.rows if r["val_ndcg"] != ""]
                  for run in seeds.values()]
        n = min(len(c) for c in curves)
        xs = [_mean([c[j][0] for c in curves]) for j in range(n)]
        ys = [_mean([c[j][1] for c in curves]) for j in range(n)]
        ax.plot(xs, ys, marker="o", ms=3, label=name, color=f"C{i % 10}",
                linestyle="-" if i < 10 else "--")
    if REFERENCE in runs:
        target = _mean([final_val(r.rows) for r in runs[REFERENCE].values()])
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"{REFERENCE} final ({target:.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training traffic, MB (up + down, serialised messages; log scale)")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("Bytes to accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="Folder of the communication sweep (outputs/sweeps/communication).")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "communication.md",
                   help="Markdown file whose results section is rewritten.")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "communication_ndcg_vs_mb.png",
                   help="Where the plot goes.")
    p.add_argument("--command", default=None, help="Command line to quote above the results (default: this one).")
    args = p.parse_args(argv)
    runs = load(args.sweep)
    if not runs:
        print(f"{args.sweep}: no finished runs", file=sys.stderr)
        return 1
    img = plot(runs, args.plot)
    command = args.command or "python -m simulations.communication_report " + " ".join(sys.argv[1:] if argv is None
                                                                                          else argv)
    try:
        rel = img.resolve().relative_to(args.doc.resolve().parent)
    except ValueError:
        rel = img.resolve()
    text = (f"Produced by `{command}` from {sum(len(s) for s in runs.values())} finished runs in "
            f"`{args.sweep}`.\n\n{tables(runs)}\n![validation NDCG@10 vs cumulative MB]({rel})\n")
    print(text)
    splice(args.doc, SECTION, text)
    print(f"written: {args.doc}, {img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
