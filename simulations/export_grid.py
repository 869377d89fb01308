"""The compression grid of ``simulations.export_bench --grid``: precision x pruning x recovery.

For every combination, the student is compressed as ``fedkd export`` does it
(``fedkd.compress``, then ``fedkd.export.export_onnx``), loaded back with the
:class:`~fedkd.export.Recommender` and measured on the file itself:

* size of the ONNX file (what a device stores);
* p50 / p99 latency of one top-10 request (``Recommender.recommend``, batch 1, history
  excluded) on ``--threads`` cores;
* overlap@10 with the fp32 file's top-10 on the edge users' test histories;
* test NDCG@10 of the file's top-10 on the edge users (the held-out item ranked against
  every item, the user's history masked but the target, as ``fedkd.metrics``).

Recovery fine-tunes on ``fedkd.recover.server_histories``: the proxy set and the cloud users'
histories, never an edge user's. The test users are the edge users: no part of the grid sees
their test items before measuring.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from fedkd.compress import CompressionSpec, compress
from fedkd.export import Recommender, export_onnx
from fedkd.recover import RecoveryConfig, ServerData

__all__ = ["Row", "grid_specs", "pareto_front", "plot", "run_grid", "table"]


@dataclasses.dataclass
class Row:
    precision: str
    kind: str  # "-" when not pruned
    sparsity: float
    recovered: bool
    size: int
    p50: float
    p99: float
    overlap: float
    ndcg: float
    per_user: np.ndarray = dataclasses.field(repr=False)
    record: dict = dataclasses.field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        prune = f"{self.kind} {self.sparsity:.0%}" if self.sparsity else "none"
        return f"{self.precision}, {prune}, recovery {'on' if self.recovered else 'off'}"


def grid_specs(precisions: list[str], kinds: list[str], sparsities: list[float], recovery: RecoveryConfig
               ) -> list[CompressionSpec]:
    """Every combination but fp32 unpruned (the reference row :func:`run_grid` adds itself; with
    recovery there would be nothing to recover)."""
    off = dataclasses.replace(recovery, steps=0)
    specs = []
    for precision in precisions:
        for s in sparsities:
            for kind in (kinds if s > 0 else kinds[:1]):
                for rec in (off, recovery) if recovery.steps else (off,):
                    if s == 0 and precision == "fp32":
                        continue
                    specs.append(CompressionSpec(prune_kind=kind, sparsity=s, precision=precision, recovery=rec))
    return specs


def ndcg_of_topk(ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-user NDCG@k of top-k lists against one held-out item each."""
    hit = ids == targets[:, None]  # (U, k)
    gain = 1.0 / np.log2(np.arange(ids.shape[1]) + 2.0)  # (k,)
    return (hit * gain).sum(1)


def measure(path: Path, spec: CompressionSpec, *, ev, seen, ref_ids: np.ndarray | None, k: int, threads: int,
            requests: int, warmup: int, latency) -> Row:
    rec = Recommender(path, threads=threads)
    ids, _ = rec.topk(ev.histories, k, seen)
    per_user = ndcg_of_topk(ids, ev.targets)
    ref = ids if ref_ids is None else ref_ids
    overlap = float(np.mean([len(set(a) & set(b)) for a, b in zip(ids.tolist(), ref.tolist())]) / k)
    p50, p99 = latency(rec, list(ev.seen), k, requests, warmup)
    return Row(precision=spec.precision, kind=spec.prune_kind if spec.sparsity else "-", sparsity=spec.sparsity,
               recovered=spec.recovery.steps > 0, size=path.stat().st_size, p50=p50, p99=p99, overlap=overlap,
               ndcg=float(per_user.mean()), per_user=per_user, record=rec.meta.get("compression", {}))


def run_grid(model, specs: list[CompressionSpec], data: ServerData, *, ev, seen, out_dir: Path, k: int,
             threads: int, requests: int, warmup: int, latency, log=print) -> tuple[Row, list[Row]]:
    """(the uncompressed fp32 file's row, a row per spec)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = out_dir / "grid-fp32.onnx"
    export_onnx(model, base_path)
    base_spec = CompressionSpec()
    base = measure(base_path, base_spec, ev=ev, seen=seen, ref_ids=None, k=k, threads=threads, requests=requests,
                   warmup=warmup, latency=latency)
    ref_ids = Recommender(base_path).topk(ev.histories, k, seen)[0]
    rows = []
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        compressed, record = compress(model, spec, data=data if spec.recovery.steps else None)
        path = out_dir / f"grid-{i:03d}.onnx"
        export_onnx(compressed, path, precision=spec.precision, extra={"compression": record})
        row = measure(path, spec, ev=ev, seen=seen, ref_ids=ref_ids, k=k, threads=threads, requests=requests,
                      warmup=warmup, latency=latency)
        rows.append(row)
        log(f"[{i + 1}/{len(specs)}] {row.name}: {row.size:,} B, NDCG@{k} {row.ndcg:.4f}, overlap {row.overlap:.3f} "
            f"({time.perf_counter() - t0:.0f} s)")
    return base, rows


def pareto_front(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both size (smaller) and NDCG (higher), by size."""
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r.size, -r.ndcg)):
        if r.ndcg > best:
            front.append(r)
            best = r.ndcg
    return front


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of the mean per-user difference ``a - b`` (the same users)."""
    d = a - b
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def table(base: Row, rows: list[Row], *, plain_size: int, k: int) -> list[str]:
    front = {id(r) for r in pareto_front([base, *rows])}
    out = [f"| precision | pruning | recovery | size (B) | vs fp32 | vs plain fp32 | p50 ms | p99 ms | "
           f"overlap@{k} | NDCG@{k} | vs fp32 | Pareto |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in [base, *rows]:
        prune = f"{r.kind} {r.sparsity:.0%}" if r.sparsity else "0%"
        out.append(f"| {r.precision} | {prune} | {'on' if r.recovered else 'off'} | {r.size:,} | "
                   f"{r.size / base.size:.0%} | {r.size / plain_size:.0%} | {r.p50:.3f} | {r.p99:.3f} | "
                   f"{r.overlap:.3f} | {r.ndcg:.4f} | {r.ndcg / base.ndcg:.1%} | {'*' if id(r) in front else ''} |")
    return out


def plot(base: Row, rows: list[Row], path: Path, *, plain_size: int, k: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fp32": "tab:blue", "fp16": "tab:green", "bf16": "tab:olive", "int8": "tab:red"}
    markers = {"-": "o", "weights": "s", "rows": "^", "dims": "D"}
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for r in [base, *rows]:
        ax.scatter(r.size / 1024, r.ndcg, c=colors[r.precision] if r.recovered or r is base else "none",
                   edgecolors=colors[r.precision], marker=markers[r.kind], s=40, linewidths=1.2, zorder=3)
    front = pareto_front([base, *rows])
    ax.plot([r.size / 1024 for r in front], [r.ndcg for r in front], "k--", lw=1, zorder=2, label="Pareto front")
    ax.axhline(0.98 * base.ndcg, color="grey", lw=0.8, ls=":")
    ax.axvline(0.25 * plain_size / 1024, color="grey", lw=0.8, ls=":")
    ax.text(0.25 * plain_size / 1024, ax.get_ylim()[0], " 25% of the plain fp32 file", fontsize=7, va="bottom",
            color="grey")
    ax.text(ax.get_xlim()[1], 0.98 * base.ndcg, "98% of fp32 NDCG ", fontsize=7, ha="right", va="bottom", color="grey")
    for name, c in colors.items():
        ax.scatter([], [], c=c, marker="o", label=name)
    for name, m in markers.items():
        ax.scatter([], [], c="none", edgecolors="k", marker=m, label="unpruned" if name == "-" else f"pruned {name}")
    ax.scatter([], [], c="k", marker="o", label="filled: recovery on")
    ax.set_xscale("log")
    ax.set_xlabel("ONNX file size (KiB, log scale)")
    ax.set_ylabel(f"test NDCG@{k} (edge users)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
