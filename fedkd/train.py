"""Central training: the cloud teacher and the centralised baselines.

:func:`train_step` is also the federated clients' local step, so it holds no epoch,
scheduling or evaluation logic: one batch in, one optimiser step, the loss out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.metrics import EvalSetLike, evaluate_ranking

log = logging.getLogger("fedkd")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3  # stop after this many epochs without a better validation NDCG@10
    max_seconds: float | None = None  # wall-clock cap, checked between epochs
    seed: int = 0  # shuffling and dropout
    # Options added for the strong centralized reference (docs/screening.md); the defaults
    # reproduce the original recipe exactly, and a teacher's cache key ignores them while
    # they hold their defaults (fedkd.teacher.teacher_cache_key), so cached teachers stay valid.
    lr_schedule: str = "constant"  # constant | cosine (per step, from lr down to 0 over `epochs`)
    warmup_epochs: float = 0.0  # linear warm-up from 0 over this many epochs (cosine or constant after)
    min_epochs: int = 0  # never stop early before this many epochs
    # Choose the epoch on the mean of the last n validations (the newest model of the best
    # window), as the federated runs choose their round (`val-smoothing`): with one held-out
    # item per user, a few hundred users' validation swings by about +-0.01 between epochs, and
    # a single lucky epoch would otherwise pick an early model and stop the run (patience
    # counts epochs without a better smoothed value).
    val_smoothing: int = 1
    # Mixed precision: bf16 autocast of forward and loss on a CUDA device (weights, optimiser
    # state and gradients stay fp32). Ignored, with a warning, on a CPU. bf16 and not fp16:
    # the models' finite masks (finfo(float32).min) overflow fp16 to -inf, and an all-padding
    # attention row would turn into NaN; bf16 has float32's range and needs no loss scaling.
    amp: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "val_smoothing"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr < 0 or self.weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {self.lr}, {self.weight_decay}")
        if self.max_seconds is not None and self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 or None, got {self.max_seconds}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.warmup_epochs < 0 or self.min_epochs < 0:
            raise ValueError(f"warmup_epochs and min_epochs must be >= 0, got {self.warmup_epochs}, "
                             f"{self.min_epochs}")


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` before optimiser step ``step`` (0-based): linear warm-up, then
    constant or a cosine down to 0 at the end of ``cfg.epochs``."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    total = max(cfg.epochs * steps_per_epoch - warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warm) / total, 1.0)))


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]  # best-by-validation weights, a CPU copy
    best_epoch: int
    best_valid_ndcg: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, loss, valid_hr, valid_ndcg, seconds


def train_step(model: nn.Module, opt: torch.optim.Optimizer, hist: torch.Tensor, target: torch.Tensor, *,
               kd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, kd_weight: float = 0.0,
               temperature: float = 1.0, clip_norm: float | None = None, amp: bool = False) -> float:
    """One optimiser step on next-item cross-entropy, plus optional distillation.

    The KD term is scaled by ``T**2`` so its gradients keep the CE term's magnitude as the
    temperature changes (Hinton et al., 2015); ``kd_weight`` alone then trades the two off.
    With ``kd_weight == 0`` the KD batch is not even forwarded, so plain federated training
    is bit-identical to the KD path switched off (same dropout draws).

    Parameters
    ----------
    hist, target : (B, L) and (B,) int64 private samples.
    kd : (kd_hist (P, L), kd_ids (P, k) int64, kd_probs (P, k) float32) teacher soft labels.
    clip_norm : clip the gradient's global norm to this before stepping (None = no clipping);
        federated clients use it so that a large local learning rate cannot blow a step up.
    amp : bf16 autocast of the forward pass and the loss (callers pass it on CUDA only; see
        ``TrainConfig.amp``).

    Returns
    -------
    The total loss of this step (before the update).
    """
    model.train()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(hist.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(hist), target)  # model(hist): (B, N + 1)
        if kd is not None and kd_weight > 0:
            from fedkd.distill import kd_loss  # lazy: distillation is optional for central training

            kd_hist, kd_ids, kd_probs = kd
            loss = loss + kd_weight * temperature ** 2 * kd_loss(model(kd_hist), kd_ids, kd_probs,
                                                                 temperature=temperature)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return float(loss.detach())


def use_amp(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether ``cfg.amp`` applies on ``device``: on a GPU only; on a CPU it says so and trains fp32
    (CPU autocast runs bf16 matmuls through slow paths and buys no memory a CPU lacks)."""
    if cfg.amp and device.type != "cuda":
        log.warning("amp (bf16 mixed precision) needs a CUDA GPU; this teacher trains on %s in float32", device)
        return False
    return cfg.amp


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


def train_central(model: nn.Module, train: tuple[np.ndarray, np.ndarray], valid: EvalSetLike, cfg: TrainConfig, *,
                  progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Adam on shuffled ``(histories (S, L), targets (S,))`` with early stopping on
    validation NDCG@10; the best weights are loaded back into ``model`` before returning.

    Shuffling draws from ``np.random.default_rng(cfg.seed)`` and dropout from a torch RNG
    seeded with ``cfg.seed`` inside a forked RNG, so a run is reproducible and leaves the
    caller's global RNG state untouched.
    """
    if len(valid.targets) == 0:
        raise ValueError("early stopping needs a non-empty validation set")
    device = next(model.parameters()).device
    hist_all = torch.as_tensor(train[0], dtype=torch.long)  # (S, L)
    target_all = torch.as_tensor(train[1], dtype=torch.long)  # (S,)
    S = len(target_all)
    if S == 0 or hist_all.shape[0] != S:
        raise ValueError(f"need matching non-empty histories and targets, got {tuple(hist_all.shape)}, {S}")
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    best_state, best_epoch, best_ndcg, bad = _cpu_copy(model), 0, -np.inf, 0
    start = time.perf_counter()
    scheduled = cfg.lr_schedule != "constant" or cfg.warmup_epochs > 0
    amp = use_amp(cfg, device)
    steps_per_epoch, step = -(-S // cfg.batch_size), 0
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            perm = torch.from_numpy(rng.permutation(S))
            total = 0.0
            for i in range(0, S, cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                if scheduled:
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * lr_factor(cfg, step, steps_per_epoch)
                    step += 1
                total += len(idx) * train_step(model, opt, hist_all[idx].to(device), target_all[idx].to(device),
                                               amp=amp)
            train_seconds = time.perf_counter() - t0
            res = evaluate_ranking(model, valid, k=10)
            record = {"epoch": epoch, "loss": total / S, "valid_hr": res.hr, "valid_ndcg": res.ndcg,
                      "seconds": time.perf_counter() - t0, "train_seconds": train_seconds}
            history.append(record)
            if progress is not None:
                progress(record)
            window = [h["valid_ndcg"] for h in history[-cfg.val_smoothing:]]
            smoothed = float(np.mean(window))
            if len(window) == min(cfg.val_smoothing, epoch) and smoothed > best_ndcg:
                best_state, best_epoch, best_ndcg, bad = _cpu_copy(model), epoch, smoothed, 0
            else:
                bad += 1
            if bad >= cfg.patience and epoch >= cfg.min_epochs:
                break
            if cfg.max_seconds is not None and time.perf_counter() - start >= cfg.max_seconds:
                break
    model.load_state_dict(best_state)
    return TrainResult(state=best_state, best_epoch=best_epoch, best_valid_ndcg=float(best_ndcg),
                       epochs_run=len(history), history=history)
