"""PNG plots of a run: validation metric vs round and vs cumulative megabytes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(rows: Sequence[dict], out_dir: Path, *, k: int, title: str,
             references: dict[str, float] | None = None) -> list[Path]:
    """Validation NDCG and HR against round and against megabytes; ``references`` (e.g. the
    teacher's and popularity's validation NDCG on the same users) become dashed lines."""
    rows = [r for r in rows if r.get("val_ndcg") not in ("", None)]
    if not rows:
        return []
    rounds = [r["round"] for r in rows]
    mb = [r["cum_bytes"] / 1e6 for r in rows]
    paths = []
    for x, xlabel, name in ((rounds, "round", "metrics_vs_round.png"),
                            (mb, "cumulative training traffic (MB, up + down)", "metrics_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [r["val_ndcg"] for r in rows], marker="o", label=f"NDCG@{k}")
        ax.plot(x, [r["val_hr"] for r in rows], marker="s", label=f"HR@{k}")
        for (ref, value), color in zip((references or {}).items(), ("tab:red", "tab:gray", "tab:purple")):
            ax.axhline(value, linestyle="--", color=color, label=f"{ref} NDCG@{k}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation (full ranking, history masked)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(save_figure(fig, out_dir / name))
    return paths


def save_figure(fig, path: Path, *, dpi: int = 110) -> Path:
    """Lay out, write (making its folder) and close ``fig``; returns ``path``. Closing matters:
    pyplot keeps every open figure alive, and a sweep's report draws many."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
