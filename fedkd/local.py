"""What one edge client does with the student it receives: train under a budget, evaluate.

Plain PyTorch, no Flower: the ClientApp only decodes messages, calls these, and packs
the reply, so the same code runs in simulation, on a real device and in tests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedkd.budget import StepBudget
from fedkd.train import train_step


@dataclass(frozen=True)
class ProxyBatch:
    """Public proxy histories with the teacher's top-k soft labels for them."""

    histories: np.ndarray  # (P, L) int64
    ids: np.ndarray        # (P, k) int64
    probs: np.ndarray      # (P, k) float32


@dataclass(frozen=True)
class LocalResult:
    steps: int
    examples: int
    mean_loss: float
    seconds: float


def set_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})


def get_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def local_train(model: torch.nn.Module, samples: tuple[np.ndarray, np.ndarray],
                proxy: ProxyBatch | None, *, budget: StepBudget, batch_size: int,
                kd_batch_size: int, lr: float, kd_weight: float, temperature: float,
                rng: np.random.Generator, optimizer: str = "sgd",
                clip_norm: float | None = None) -> LocalResult:
    """Spend the whole budget on optimiser steps of CE on private prefixes (+ KD on proxy samples).

    Private batches walk a fresh permutation of the client's samples (an epoch), so a
    client with few samples revisits each before repeating any. With ``kd_weight == 0``
    or no proxy batch, the loss is exactly plain CE.
    """
    hist, target = samples
    t0 = time.perf_counter()
    model.train()
    # A fresh optimiser each round: no optimiser state survives between rounds on a device.
    # Plain SGD by default: its updates are scaled gradients, so the server's average is a
    # large-batch gradient step; Adam's sign-like first steps averaged over hundreds of
    # one-user clients proved unstable in our MovieLens tuning (docs/results.md).
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"unknown local optimizer {optimizer!r}: use sgd or adam")
    order, pos, losses = rng.permutation(len(target)), 0, []
    use_kd = proxy is not None and kd_weight > 0
    while budget.remaining > 0 and len(target) > 0:
        if pos >= len(order):
            order, pos = rng.permutation(len(target)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        kd = None
        if use_kd:
            j = rng.choice(len(proxy.ids), size=min(kd_batch_size, len(proxy.ids)), replace=False)
            kd = (torch.from_numpy(proxy.histories[j]), torch.from_numpy(proxy.ids[j]),
                  torch.from_numpy(proxy.probs[j]))
        budget.spend()
        losses.append(train_step(model, opt, torch.from_numpy(hist[idx]), torch.from_numpy(target[idx]),
                                 kd=kd, kd_weight=kd_weight if use_kd else 0.0,
                                 temperature=temperature, clip_norm=clip_norm))
    model.eval()
    return LocalResult(steps=budget.spent, examples=int(len(target)),
                       mean_loss=float(np.mean(losses)) if losses else float("nan"),
                       seconds=time.perf_counter() - t0)
