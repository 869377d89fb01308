"""Markdown table of screening runs (simulations/screen.py): validation NDCG@10 at fixed rounds,
best validation, test of the round chosen on validation, teacher on the edge users, wall time.

    python -m simulations.screen_table outputs/screen [--tags a b c] [--plot docs/img/ablation_screen.png]

``--plot`` also draws the validation curves of the tags against the round.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def curve_at(path: Path, rounds: list[int]) -> dict[int, float | None]:
    rows = [r for r in csv.DictReader(path.open()) if r.get("val_ndcg")] if path.exists() else []
    by_round = {int(r["round"]): float(r["val_ndcg"]) for r in rows}
    return {k: by_round.get(k) for k in rounds}


def best_upto(path: Path, upto: int) -> float | None:
    rows = [r for r in csv.DictReader(path.open()) if r.get("val_ndcg") and int(r["round"]) <= upto]
    return max(float(r["val_ndcg"]) for r in rows) if rows else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--tags", nargs="*")
    p.add_argument("--rounds", type=int, nargs="*", default=[10, 20, 30])
    p.add_argument("--plot", type=Path, help="Also write the tags' validation curves to this PNG.")
    args = p.parse_args(argv)
    runs = [json.loads(line) for line in (args.folder / "screen.jsonl").read_text().splitlines() if line.strip()]
    last = {r["tag"]: r for r in runs}  # the latest run of each tag
    tags = args.tags or list(last)
    cut = max(args.rounds)
    head = (["tag", "rounds"] + [f"val@{r}" for r in args.rounds]
            + [f"best val <= {cut}", "best val (round)", "test NDCG@10", "teacher edge test", "wall s"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for t in tags:
        r = last[t]
        c = curve_at(args.folder / f"{t}.csv", args.rounds)
        b = best_upto(args.folder / f"{t}.csv", cut)
        cells = [f"`{t}`", str(r["rounds_run"])] + [f"{c[k]:.4f}" if c[k] is not None else "" for k in args.rounds]
        cells += [f"{b:.4f}" if b is not None else "", f"{r['best_val_ndcg10']:.4f} ({r['best_round']})",
                  f"{r['test_ndcg10']:.4f}", f"{r['teacher_edge_test_ndcg10']:.4f}", f"{r['wall_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    if args.plot:
        plot_curves(args.folder, tags, args.plot)
    return 0


def plot_curves(folder: Path, tags: list[str], path: Path) -> Path:
    from fedkd.plots import plt, save_figure  # here: the table alone needs no matplotlib

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t in tags:
        rows = [r for r in csv.DictReader((folder / f"{t}.csv").open()) if r.get("val_ndcg")]
        ax.plot([int(r["round"]) for r in rows], [float(r["val_ndcg"]) for r in rows], marker=".", label=t)
    ax.set_xlabel("round")
    ax.set_ylabel("validation NDCG@10 (all edge users)")
    ax.set_title("screens (bare loop, MovieLens-100K, 20% cloud, seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
