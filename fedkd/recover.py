"""Recovery by distillation: a short server-side fine-tune of a compressed student towards the
full student it came from, on data the server holds.

Why distil from the full student rather than retrain on labels: the full student is what the
federation agreed on; the compressed copy should make the same recommendations, and its
predictions give a dense target on every history the server has, with no labels needed.

**Data** (:func:`server_histories`): the public proxy set and the cloud users' training
prefixes, derived as the server derives them (``fedkd.population`` and
``fedkd.proxy.build_proxy_set``, as ``server/cloud.py`` does). The proxy set is a sample of
those prefixes, so the union is the cloud prefixes; both are named in the record all the
same. Edge users' histories are never read: they are private to their clients.

**Loss** (:func:`recovery_loss`), over the items the compressed student can rank (a pruned
item scores like the padding column, see ``fedkd.prune``, and is left out on both sides):

* ``kl``: ``T^2 KL(softmax(full / T) || softmax(compressed / T))`` (Hinton et al., 2015);
* ``mse``: the mean squared difference of the logits;
* ``kl+mse``: their sum.

**Precision-aware** (``precision`` other than fp32): the fine-tune runs under
``fedkd.precision.fake_precision``, so for int8 it is quantisation-aware training: the forward
pass sees int8-rounded weights and activations, the gradient passes straight through.

The student is fine-tuned in eval mode (no dropout): the target is the deterministic full
student, and a few hundred steps gain nothing from dropout's noise. Pruning masks stay fixed
(``torch.nn.utils.prune``'s reparametrisation), so pruned weights stay zero. Batches come from
the named stream ``Stream.COMPRESS_RECOVERY``; a held-out slice of the server's histories
(never trained on) measures the divergence before and after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedkd import streams
from fedkd.precision import fake_precision
from fedkd.streams import Stream

__all__ = ["LOSSES", "RecoveryConfig", "ServerData", "divergence", "recover", "recovery_loss", "server_histories"]

LOSSES = ("kl", "mse", "kl+mse")
_UNRANKABLE = torch.finfo(torch.float32).min / 4  # below: the padding column and pruned items


@dataclass(frozen=True)
class RecoveryConfig:
    steps: int = 300  # Adam steps; 0 = no recovery
    lr: float = 1e-3
    batch_size: int = 128  # histories per step
    temperature: float = 2.0  # of the KL term (fedkd's kd-temperature default)
    loss: str = "kl"  # kl | mse | kl+mse
    holdout: int = 512  # server histories kept out of the fine-tune to measure it
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.holdout < 0:
            raise ValueError(f"steps and holdout must be >= 0 and batch_size >= 1, got {self.steps}, "
                             f"{self.holdout}, {self.batch_size}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"lr and temperature must be > 0, got {self.lr}, {self.temperature}")
        if self.loss not in LOSSES:
            raise ValueError(f"recovery loss must be one of {LOSSES}, got {self.loss!r}")


@dataclass(frozen=True)
class ServerData:
    """Histories the server may fine-tune on, and where they came from."""

    histories: np.ndarray  # (S, L) int64, unique rows
    proxy_rows: int
    cloud_users: int
    cloud_prefixes: int

    def record(self) -> dict:
        return {"data": "proxy+cloud", "proxy_rows": self.proxy_rows, "cloud_users": self.cloud_users,
                "cloud_prefixes": self.cloud_prefixes, "histories": int(len(self.histories)),
                "edge_histories": 0}


def server_histories(cfg) -> ServerData:
    """The proxy set and the cloud users' training prefixes of the experiment ``cfg``
    (an ``ExperimentConfig``), as the server builds them; no edge user is read."""
    from fedkd.population import population
    from fedkd.proxy import build_proxy_set
    from fedkd.samples import train_samples

    pop = population(cfg)
    seqs, cloud = pop.dataset.sequences, pop.cloud_users
    if len(cloud) == 0:
        raise ValueError("recovery needs server data, but this experiment has no cloud users (cloud-fraction 0)")
    prefixes, _ = train_samples([seqs[u][:-2] for u in cloud], cfg.max_len)
    proxy = build_proxy_set(seqs, cloud, size=cfg.proxy_size, max_len=cfg.max_len, seed=cfg.seed)
    both = np.unique(np.concatenate([proxy, prefixes]), axis=0)  # sorted, so independent of the order
    return ServerData(histories=both.astype(np.int64), proxy_rows=len(proxy), cloud_users=len(cloud),
                      cloud_prefixes=len(prefixes))


def recovery_loss(student_logits: torch.Tensor, full_logits: torch.Tensor, *, temperature: float,
                  loss: str = "kl") -> torch.Tensor:
    """Distance of ``(B, N + 1)`` student logits from the full student's, over the items the
    student can rank (column 0 and pruned items are ``< finfo.min / 4`` there and are left out)."""
    s, t = student_logits[:, 1:], full_logits[:, 1:].detach()  # (B, N)
    rankable = s > _UNRANKABLE
    floor = torch.finfo(s.dtype).min / 2
    t = torch.where(rankable, t, floor)  # the full student, restricted to the same items
    total = s.new_zeros(())
    if loss in ("kl", "kl+mse"):
        log_s = F.log_softmax(torch.where(rankable, s, floor) / temperature, dim=1)
        log_t = F.log_softmax(t / temperature, dim=1)
        total = total + temperature ** 2 * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    if loss in ("mse", "kl+mse"):
        total = total + ((s - t) ** 2 * rankable).sum() / rankable.sum().clamp(min=1)
    return total


@torch.no_grad()
def divergence(student: nn.Module, full: nn.Module, histories: np.ndarray, *, temperature: float = 2.0,
               loss: str = "kl", precision: str = "fp32", batch_size: int = 512) -> float:
    """Mean :func:`recovery_loss` of ``student`` (as stored at ``precision``) on ``histories``."""
    student.eval()
    full.eval()
    total, n = 0.0, 0
    with fake_precision(student, precision):
        for i in range(0, len(histories), batch_size):
            h = torch.from_numpy(histories[i:i + batch_size])
            total += float(recovery_loss(student(h), full(h), temperature=temperature, loss=loss)) * len(h)
            n += len(h)
    return total / max(n, 1)


def recover(student: nn.Module, full: nn.Module, data: ServerData, cfg: RecoveryConfig, *,
            precision: str = "fp32") -> dict:
    """Fine-tune ``student`` in place towards ``full``; returns the record for the sidecar
    (config, data used, held-out divergence before and after)."""
    rng = streams.rng(cfg.seed, Stream.COMPRESS_RECOVERY)
    order = rng.permutation(len(data.histories))
    held, train = data.histories[order[:cfg.holdout]], data.histories[order[cfg.holdout:]]
    if len(train) == 0:
        raise ValueError(f"no server histories left to fine-tune on after holding out {cfg.holdout}")
    div = dict(temperature=cfg.temperature, loss=cfg.loss, precision=precision)
    before = divergence(student, full, held, **div) if len(held) else float("nan")
    full.eval()
    student.eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=cfg.lr)
    with fake_precision(student, precision):
        for _ in range(cfg.steps):
            h = torch.from_numpy(train[rng.integers(0, len(train), size=min(cfg.batch_size, len(train)))])
            with torch.no_grad():
                target = full(h)  # (B, N + 1)
            opt.zero_grad(set_to_none=True)
            recovery_loss(student(h), target, temperature=cfg.temperature, loss=cfg.loss).backward()
            opt.step()
    after = divergence(student, full, held, **div) if len(held) else float("nan")
    return {**asdict(cfg), **data.record(), "precision_aware": precision, "holdout_divergence_before": before,
            "holdout_divergence_after": after}
