"""docs/convergence.csv and the tables and plots of docs/convergence.md (issue 21).

    fedkd sweep simulations/sweeps/convergence.toml --set data-path=../shared/data/ml-100k/u.data
    python -m simulations.convergence_table

Rows: every finished run of the convergence sweep (``fedkd``, ``fedavg``: real Flower
simulations), the centralized reference (``simulations/central_ref.py``, one JSON line per
run in ``--central``), and, per cloud fraction and seed, the cloud teacher and popularity
scored on the same edge users (computed here from the teacher the fedkd run cached, so they
cost no Flower run). Everything is scored on the edge users' test items, full ranking,
history masked, for the round (or epoch) chosen on validation.

Time to accuracy uses the smoothed validation curve (``val_ndcg_smoothed``, the mean of the
last ``val-smoothing`` validations): the first round whose smoothed validation reaches
``--share`` (90%) of the centralized student's validation NDCG@10, with the bytes and the
simulated device time spent until then.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from simulations import ROOT
from simulations.docsplice import splice
from simulations.runs import Run, load_run, split_seed

COLUMNS = ("config", "seed", "cloud_fraction", "rounds", "best_round", "test_ndcg10", "test_hr10", "val_ndcg10",
           "bytes_total", "sim_time_s", "wall_s", "target_val", "rounds_to_target", "mb_to_target",
           "sim_s_to_target")
SHARES = (0.7, 0.8, 0.9)  # time-to-accuracy targets, as shares of the centralized validation NDCG@10


def time_to(run: Run, target: float) -> dict:
    """Round, MB and simulated seconds at which the smoothed validation first reached ``target``."""
    for r in run.rows:
        v = r.get("val_ndcg_smoothed", r.get("val_ndcg"))
        if v not in ("", None) and float(v) >= target:
            return {"rounds_to_target": int(r["round"]), "mb_to_target": float(r["cum_bytes"]) / 1e6,
                    "sim_s_to_target": float(r["sim_time_s"])}
    return {}


def federated_row(run: Run, central_val: float | None, share: float) -> dict:
    s, cfg = run.summary, run.config
    name, seed = split_seed(run.name)
    row = {"config": name.rsplit("-c", 1)[0], "seed": seed, "cloud_fraction": cfg["cloud-fraction"],
           "rounds": s["rounds_run"], "best_round": s["best_round"], "test_ndcg10": s["test_ndcg@10"],
           "test_hr10": s["test_hr@10"], "val_ndcg10": s["best_val_ndcg"], "bytes_total": s["train_bytes_total"],
           "sim_time_s": s["sim_time_s"], "wall_s": s["wall_seconds"]}
    if central_val:
        row["target_val"] = share * central_val
        row.update(time_to(run, share * central_val))
    return row


def reference_rows(run: Run) -> list[dict]:
    """The cached teacher and popularity on the run's edge users (validation and test)."""
    from fedkd.config import ExperimentConfig
    from fedkd.metrics import evaluate_ranking, score_ranking
    from fedkd.popularity import popularity_scorer
    from fedkd.population import population
    from fedkd.samples import eval_set, train_samples
    from fedkd.teacher import load_or_train

    cfg = ExperimentConfig.from_flat(run.config)
    pop = population(cfg)
    seqs, n_items = pop.dataset.sequences, pop.dataset.num_items
    edge, cloud = np.sort(np.concatenate(pop.clients)), pop.cloud_users
    valid, test = (eval_set(seqs, edge, split, cfg.max_len) for split in ("valid", "test"))
    teacher, _ = load_or_train(cfg.teacher_model(n_items), cfg.teacher_train(), pop.dataset.fingerprint(),
                               train_samples([seqs[u][:-2] for u in cloud], cfg.max_len),
                               eval_set(seqs, cloud, "valid", cfg.max_len), cache_dir=Path(cfg.cache_dir),
                               extra={"cloud_fraction": cfg.cloud_fraction, "seed": cfg.seed})
    scorer = popularity_scorer([s[:-2] for s in seqs], n_items)
    base = {"seed": cfg.seed, "cloud_fraction": cfg.cloud_fraction}
    rows = []
    for name, score in (("teacher", lambda ev: evaluate_ranking(teacher, ev, k=cfg.eval_k)),
                        ("popularity", lambda ev: score_ranking(scorer, ev, k=cfg.eval_k))):
        v, t = score(valid), score(test)
        rows.append({"config": name, **base, "test_ndcg10": t.ndcg, "test_hr10": t.hr, "val_ndcg10": v.ndcg})
    return rows


def central_rows(path: Path) -> list[dict]:
    """The newest line per (cloud fraction, seed) of central_ref's JSON lines."""
    latest = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        d = json.loads(line)
        latest[(d["cloud_fraction"], d["seed"])] = d
    return [{"config": "centralized", "seed": d["seed"], "cloud_fraction": d["cloud_fraction"],
             "rounds": d["best_epoch"], "best_round": d["best_epoch"], "test_ndcg10": d["test_ndcg10"],
             "test_hr10": d["test_hr10"], "val_ndcg10": d["val_ndcg10"], "wall_s": d["seconds"]}
            for d in latest.values()]


def mean_sd(xs, digits: int = 4) -> str:
    xs = [float(x) for x in xs if x not in ("", None)]
    if not xs:
        return "-"
    return f"{np.mean(xs):.{digits}f}" + (f" ± {np.std(xs, ddof=1):.{digits}f}" if len(xs) > 1 else "")


def speed_table(runs: dict, cval: dict, cf: float) -> list[str]:
    """Rounds / MB / simulated seconds to each share of the centralized validation, per config."""
    out = ["", "Time to accuracy (smoothed validation; mean over the seeds that reached it, reached/seeds):", "",
           "| config | " + " | ".join(f"{s:.0%} of centralized: rounds / MB / sim s" for s in SHARES) + " |",
           "|---|" + "---|" * len(SHARES)]
    for name in ("fedkd", "fedavg"):
        mine = [(seed, run) for (c, n, seed), run in sorted(runs.items()) if c == cf and n == name]
        if not mine:
            continue
        cells = []
        for share in SHARES:
            hits = [time_to(run, share * cval.get((cf, seed), cval.get((cf, 0), 1.0))) for seed, run in mine]
            hits = [h for h in hits if h]
            cells.append(f"{mean_sd([h['rounds_to_target'] for h in hits], 0)} / "
                         f"{mean_sd([h['mb_to_target'] for h in hits], 0)} / "
                         f"{mean_sd([h['sim_s_to_target'] for h in hits], 1)} ({len(hits)}/{len(mine)})"
                         if hits else f"not reached (0/{len(mine)})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def tables(rows: list[dict], runs: dict, share: float, cval: dict) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["cloud_fraction"], r["config"])].append(r)
    out = []
    for cf in sorted({r["cloud_fraction"] for r in rows}):
        central = by.get((cf, "centralized"), [])
        ctest = np.mean([r["test_ndcg10"] for r in central]) if central else None
        out += [f"**{cf:.0%} cloud users** (mean ± sd over seeds; n = seeds)", "",
                "| config | n | rounds run | chosen round | test NDCG@10 | % of centralized | test HR@10 | "
                "val NDCG@10 | MB |", "|---|---|---|---|---|---|---|---|---|"]
        for name in ("centralized", "fedkd", "fedavg", "teacher", "popularity"):
            rs = by.get((cf, name), [])
            if not rs:
                continue
            pct = f"{100 * np.mean([r['test_ndcg10'] for r in rs]) / ctest:.0f}%" if ctest else "-"
            out.append(f"| {name} | {len(rs)} | {mean_sd((r.get('rounds') for r in rs), 0)} | "
                       f"{mean_sd((r.get('best_round') for r in rs), 0)} | {mean_sd(r['test_ndcg10'] for r in rs)} | "
                       f"{pct} | {mean_sd(r['test_hr10'] for r in rs)} | {mean_sd(r['val_ndcg10'] for r in rs)} | "
                       f"{mean_sd((r.get('bytes_total', '') and r['bytes_total'] / 1e6 for r in rs), 0)} |")
        out += speed_table(runs, cval, cf)
        pairs = [(runs[(cf, "fedkd", s)], runs[(cf, "fedavg", s)]) for (c, n, s) in runs
                 if c == cf and n == "fedkd" and (cf, "fedavg", s) in runs]
        if pairs:
            from fedkd.stats import paired_bootstrap
            a, b, strata = [], [], []
            for kd, avg in pairs:
                ua, ub = kd.user_ndcg(), avg.user_ndcg()
                users = sorted(set(ua) & set(ub))
                a += [ua[u] for u in users]
                b += [ub[u] for u in users]
                strata += [split_seed(kd.name)[1]] * len(users)
            d, lo, hi = paired_bootstrap(a, b, strata=strata)
            out += ["", f"fedkd − fedavg, test NDCG@10, paired over test users within seeds ({len(pairs)} seed(s)): "
                        f"**{d:+.4f}**, 95% bootstrap interval [{lo:+.4f}, {hi:+.4f}]."]
        out.append("")
    return "\n".join(out)


def plot(runs: dict, refs: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for cf in sorted({k[0] for k in runs}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for (c, name, seed), run in sorted(runs.items()):
            if c != cf:
                continue
            pts = [r for r in run.rows if r.get("val_ndcg") not in ("", None)]
            style = {"color": "C0" if name == "fedkd" else "C1", "alpha": 1.0 if seed == 0 else 0.45,
                     "label": f"{name} (seed {seed})"}
            axes[0].plot([int(r["round"]) for r in pts], [float(r["val_ndcg"]) for r in pts], **style)
            axes[1].plot([float(r["cum_bytes"]) / 1e6 for r in pts], [float(r["val_ndcg"]) for r in pts], **style)
        for i, name in enumerate(("centralized", "teacher", "popularity")):
            vals = [r["val_ndcg10"] for r in refs if r["config"] == name and r["cloud_fraction"] == cf]
            for ax in axes:
                if vals:
                    ax.axhline(np.mean(vals), ls="--", color=f"C{i + 2}", label=f"{name} (val, mean)")
        axes[0].set_xlabel("round")
        axes[1].set_xlabel("cumulative training traffic (MB, up + down)")
        axes[0].set_ylabel("validation NDCG@10 (edge users)")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle(f"MovieLens-100K, {cf:.0%} cloud users")
        fig.tight_layout()
        path = out / f"convergence_c{int(round(cf * 100))}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def current_runs(spec: Path, sweep_dir: Path) -> list[Run]:
    """The finished runs of ``sweep_dir`` whose config.json matches ``spec`` as it is now (runs of
    an earlier version of the spec, still in the folder, do not count), with the data path the
    sweep ran on."""
    from simulations.sweep import plan

    recorded = json.loads((sweep_dir / "sweep.json").read_text())["runs"] if (sweep_dir / "sweep.json").is_file() else []
    data = next((r["resolved"]["data-path"] for r in recorded if r.get("resolved", {}).get("data-path")), "")
    planned = plan(spec, output_dir=sweep_dir.parent.parent, sets={"data-path": data}, cwd=ROOT).runs
    return [load_run(r.dir) for r in planned if r.status() == "finished"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.convergence_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", type=Path, default=ROOT / "outputs/sweeps/convergence",
                   help="Folder of the convergence sweep (default: %(default)s).")
    p.add_argument("--spec", type=Path, default=ROOT / "simulations/sweeps/convergence.toml",
                   help="The sweep's spec: only runs finished with its current settings count (default: %(default)s).")
    p.add_argument("--central", type=Path, default=ROOT / "docs/convergence/central_ref.jsonl",
                   help="JSON lines of simulations/central_ref.py runs (default: %(default)s).")
    p.add_argument("--share", type=float, default=0.9,
                   help="Target as a share of the centralized validation NDCG@10 (default: %(default)s).")
    p.add_argument("--csv", type=Path, default=ROOT / "docs/convergence.csv", help="Output CSV (default: %(default)s).")
    p.add_argument("--doc", type=Path, default=ROOT / "docs/convergence.md",
                   help="Page whose <!-- convergence --> block gets the tables (default: %(default)s).")
    p.add_argument("--results", type=Path, default=ROOT / "docs/results.md",
                   help="Page whose <!-- baselines-converged --> block gets the same tables, as the baseline "
                        "table at the converged settings (default: %(default)s).")
    args = p.parse_args(argv)
    central = central_rows(args.central)
    cval = {(r["cloud_fraction"], r["seed"]): r["val_ndcg10"] for r in central}
    runs, rows, refs = {}, list(central), list(central)
    for run in current_runs(args.spec, args.sweep):
        name, seed = split_seed(run.name)
        cf = run.config["cloud-fraction"]
        key = (cf, name.rsplit("-c", 1)[0], seed)
        runs[key] = run
        cv = cval.get((cf, seed), next((v for (c, _), v in cval.items() if c == cf), None))
        rows.append(federated_row(run, cv, args.share))
        if key[1] == "fedkd":
            refs += reference_rows(run)
    rows += [r for r in refs if r["config"] != "centralized"]
    rows.sort(key=lambda r: (r["cloud_fraction"], COLUMNS.index("config"), r["config"], r["seed"]))
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    img = args.doc.parent / "img"
    img.mkdir(exist_ok=True)
    figs = plot(runs, refs, img)
    table = tables(rows, runs, args.share, cval)
    splice(args.doc, "convergence", table + "\n" + "\n".join(f"![{f.stem}](img/{f.name})" for f in figs))
    splice(args.results, "baselines-converged",
           "Command: `fedkd sweep simulations/sweeps/convergence.toml --set data-path=<ml-100k>/u.data`, then "
           "`python -m simulations.convergence_table` (settings, curves and the centralized reference: "
           "[convergence.md](convergence.md)).\n\n" + table)
    print(f"{len(rows)} rows -> {args.csv}; tables -> {args.doc}; plots: {', '.join(str(f) for f in figs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
