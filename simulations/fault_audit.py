"""Audit a faulty run: every fault the seed planned against what the server logged.

    python -m simulations.fault_audit outputs/<experiment>
    python -m simulations.fault_audit --table outputs/clean outputs/faulty ...   # compare runs
    python -m simulations.fault_audit --paired clean-s0 faulty-s0 clean-s1 faulty-s1 ...  # paired per user

Recomputes, for every train message the server sent (``wire.jsonl`` has a line per message),
the fault that client drew (:func:`fedkd.faults.draw_fault`) and the reason the server should
have logged, and compares with ``rejections.jsonl``. Prints one table row per reason:
planned, logged, and how many logged rejections match a planned fault exactly (same round,
client and reason); rejections nobody planned (e.g. ``norm``, or an honest client that timed
out) are listed as unplanned. Exit status 1 if a planned fault went unlogged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from fedkd.config import ExperimentConfig
from fedkd.faults import EXPECTED_REASON, draw_fault, malicious_ids
from simulations.runs import load_run


def _sent(out: Path):
    """(round, partition id) of every train message sent: from the per-message log (one line
    per message, ``direction`` down) or the older per-exchange one (``partitions``)."""
    for w in map(json.loads, (out / "wire.jsonl").read_text().splitlines()):
        if w.get("type") != "train":
            continue
        if "direction" in w:
            if w["direction"] == "down":
                yield w["round"], w["partition_id"]
        else:
            yield from ((w["round"], p) for p in w.get("partitions", []))


def audit(out: Path) -> dict:
    cfg = ExperimentConfig.from_flat(load_run(out).config)
    sent = sorted(_sent(out))
    planned = {(r, p): EXPECTED_REASON[f] for r, p in sent if (f := draw_fault(cfg, r, p)) is not None}
    logged = {(x["round"], x["partition_id"]): x["reason"]
              for x in map(json.loads, (out / "rejections.jsonl").read_text().splitlines()) if x["type"] == "train"}
    bad = malicious_ids(cfg)
    return {"messages": len(sent), "planned": Counter(planned.values()), "logged": Counter(logged.values()),
            "matched": Counter(c for k, c in logged.items() if planned.get(k) == c),
            "missing": sorted(k for k in planned if logged.get(k) != planned[k]),
            "unplanned": sorted((k, c) for k, c in logged.items() if k not in planned),
            "malicious_sent_clean": sum(1 for r, p in sent if p in bad and (r, p) not in planned)}


def table(dirs: list[Path]) -> str:
    """Faults, defences and test scores of finished runs; NDCG relative to the first folder."""
    rows = []
    for d in dirs:
        run = load_run(d)
        s, c = run.summary, run.config
        k = c["eval-k"]
        faults = (f"crash {c.get('fault-crash', 0):g}, corrupt {c.get('fault-corrupt', 0):g}, "
                  f"malicious [{c.get('fault-malicious', '')}] x{c.get('fault-malicious-scale', 100):g}")
        agg = c.get("aggregation", "mean") + (f" (trim {c['trim-fraction']:g})" if c.get("aggregation") ==
                                              "trimmed-mean" else "")
        if c.get("norm-bound", 0):
            agg += f", norm-bound {c['norm-bound']:g}"
        aggregated = sum(int(r["aggregated"]) for r in run.rows) / s["rounds"]
        rows.append((d.name, faults, agg, s["rejected_total"], aggregated, s[f"test_hr@{k}"], s[f"test_ndcg@{k}"]))
    base = rows[0][6]
    out = ["| run | faults | aggregation | rejected | aggregated / round | test HR@10 | test NDCG@10 | "
           "NDCG vs first |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.4f} | {r[6]:.5f} | "
            f"{(r[6] - base) / base:+.1%} |" for r in rows]
    return "\n".join(out)


def paired(dirs: list[Path]) -> str:
    """Faulty vs clean test NDCG@10 per user, for (clean, faulty) pairs of folders (one pair
    per seed), each pair alone and pooled, with a 95% bootstrap interval over users (stratified
    by pair). Both runs of a pair score the same users on the same held-out items, so the
    user-to-user variance cancels and a few seeds say more than their unpaired means."""
    import numpy as np

    from fedkd.stats import paired_bootstrap

    if len(dirs) % 2:
        raise SystemExit("--paired takes folders two by two: clean, faulty, clean, faulty, ...")

    out = ["| clean | faulty | users | clean NDCG@10 | faulty NDCG@10 | difference, 95% CI | relative |",
           "|---|---|---|---|---|---|---|"]
    xs, ys, strata = [], [], []
    for i in range(0, len(dirs), 2):
        a, b = load_run(dirs[i]).user_ndcg(), load_run(dirs[i + 1]).user_ndcg()
        users = sorted(set(a) & set(b))
        x, y = np.array([b[u] for u in users]), np.array([a[u] for u in users])
        m, lo, hi = paired_bootstrap(x, y)
        out.append(f"| {dirs[i].name} | {dirs[i + 1].name} | {len(users)} | {y.mean():.5f} | {x.mean():.5f} | "
                   f"{m:+.5f} [{lo:+.5f}, {hi:+.5f}] | {m / y.mean():+.1%} |")
        xs.append(x)
        ys.append(y)
        strata += [i] * len(users)
    if len(xs) > 1:
        x, y = np.concatenate(xs), np.concatenate(ys)
        m, lo, hi = paired_bootstrap(x, y, strata=np.array(strata))
        out.append(f"| pooled ({len(xs)} pairs) | | {len(x)} | {y.mean():.5f} | {x.mean():.5f} | "
                   f"{m:+.5f} [{lo:+.5f}, {hi:+.5f}] | {m / y.mean():+.1%} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.fault_audit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="+", help="a results folder (several with --table)")
    ap.add_argument("--table", action="store_true", help="compare finished runs instead of auditing one")
    ap.add_argument("--paired", action="store_true",
                    help="folders two by two (clean, faulty; one pair per seed): per-user paired test NDCG@10")
    args = ap.parse_args(argv)
    if args.paired:
        print(paired(args.out))
        return 0
    if args.table:
        print(table(args.out))
        return 0
    res = audit(args.out[0])
    print(f"train messages: {res['messages']}\n\n| reason | planned | logged | matched |\n|---|---|---|---|")
    for code in sorted(set(res["planned"]) | set(res["logged"])):
        print(f"| `{code}` | {res['planned'][code]} | {res['logged'][code]} | {res['matched'][code]} |")
    print(f"| total | {sum(res['planned'].values())} | {sum(res['logged'].values())} | "
          f"{sum(res['matched'].values())} |")
    print(f"\nmalicious client's well-formed updates sent: {res['malicious_sent_clean']}")
    print(f"planned but not logged: {res['missing'] or 'none'}")
    print(f"logged but not planned: {res['unplanned'] or 'none'}")
    return 1 if res["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
