"""Per-client message sizes of every configuration of a sweep spec, computed, not run.

    python -m simulations.communication_sizes simulations/sweeps/communication.toml --num-items 1682

Builds the train message a device gets and the reply it sends for each configuration with
fedkd's own encoders (student of the configured width, a random update, a random proxy batch
with top-k or full labels) and counts them as the server does
(:func:`wire.message_nbytes_by_part`). Needs no data and trains nothing, so it tells
in a second what a sweep will send per client and round; quantised sizes do not depend on the
values, only Flower's varint-coded numbers do (a few bytes). With ``kd-cache`` two rows are
printed: a device that holds none of the batch, and one that holds all of it (a frozen
teacher's rows it has seen cost their row numbers only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedkd.codec import encode_state, encode_update
from fedkd.config import ExperimentConfig
from fedkd.distill import SoftLabels
from fedkd.local import get_state
from fedkd.models import build_model
from fedkd.proxy import encode_cached_proxy, encode_full_proxy, encode_proxy
from fedkd.traffic import part_of


def message_sizes(cfg: ExperimentConfig, num_items: int, *, held: bool = False) -> dict[str, dict[str, int]]:
    """Bytes by part of one train message down and its reply up, for ``cfg`` (protocol params)."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from wire import Content, message_nbytes_by_part, pack

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    rng = np.random.default_rng(0)
    state = get_state(build_model(cfg.student_model(num_items), seed=0))
    down = Content(arrays={"student": encode_state(state, bits=cfg.student_bits, stochastic=False,
                                                   per_row=cfg.per_row)},
                   configs={"config": {"round": cfg.num_rounds, "width": cfg.student_dim, "steps": 16}})
    if cfg.kd_weight > 0:
        rows = cfg.proxy_batch
        hist = rng.integers(0, num_items + 1, size=(rows, cfg.max_len))
        down.configs["config"]["proxy-rows"] = rows
        if cfg.soft_label_format == "full":
            down.arrays["proxy"] = encode_full_proxy(hist, rng.dirichlet(np.ones(num_items), rows).astype(np.float32),
                                                     num_items=num_items)
        else:
            k = cfg.kd_top_k
            ids = np.stack([rng.choice(np.arange(1, num_items + 1), k, replace=False) for _ in range(rows)])
            sl = SoftLabels(ids=ids, probs=rng.dirichlet(np.ones(k + 1), rows)[:, :k].astype(np.float32))
            if cfg.kd_cache:
                need = np.full(rows, not held)
                down.arrays["proxy"] = encode_cached_proxy(np.arange(rows), hist, sl, need, need,
                                                           proxy_len=cfg.proxy_size, num_items=num_items,
                                                           bits=cfg.soft_label_bits)
                down.configs["config"]["proxy-size"] = cfg.proxy_size
            else:
                down.arrays["proxy"] = encode_proxy(hist, sl, num_items=num_items, bits=cfg.soft_label_bits)
    update = {k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in state.items()}
    up = Content(arrays={"update": encode_update(update, bits=cfg.quant_bits, stochastic=True, rng=rng,
                                                 per_row=cfg.per_row, density=cfg.update_density)},
                 metrics={"metrics": {"num-examples": 100, "steps": 16, "step-limit": 16, "tier": 1,
                                      "partition-id": 100, "loss": 7.0, "train-seconds": 0.5}})
    return {d: message_nbytes_by_part(Message(pack(c), dst_node_id=1, message_type="train"), part_of)
            for d, c in (("down", down), ("up", up))}


def table(configs: dict[str, ExperimentConfig], num_items: int) -> str:
    lines = ["| config | down kB | student | proxy histories | soft labels | up kB | kB per client and round | "
             "vs first |", "|---|---|---|---|---|---|---|---|"]
    first = None
    for name, cfg in configs.items():
        for held in ([False, True] if cfg.kd_cache and cfg.kd_weight > 0 else [False]):
            s = message_sizes(cfg, num_items, held=held)
            d, u = sum(s["down"].values()), sum(s["up"].values())
            first = first or d + u
            label = name + (" (device holds the batch)" if held else " (new rows)" if cfg.kd_cache else "")
            lines.append(f"| {label} | {d / 1e3:.1f} | {s['down'].get('student', 0) / 1e3:.1f} | "
                         f"{s['down'].get('proxy_inputs', 0) / 1e3:.2f} | {s['down'].get('soft_labels', 0) / 1e3:.2f} | "
                         f"{u / 1e3:.1f} | {(d + u) / 1e3:.1f} | {100 * (d + u) / first:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from simulations.sweep import plan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", type=Path, help="Sweep spec (simulations/sweeps/communication.toml).")
    p.add_argument("--num-items", type=int, default=1682, help="Catalogue size N (1682 = MovieLens-100K).")
    args = p.parse_args(argv)
    sweep = plan(args.spec, seeds=[0])
    configs = {r.config: ExperimentConfig.from_flat(r.resolved) for r in sweep.runs}
    print(table(configs, args.num_items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
