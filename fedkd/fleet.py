"""Knowledge flowing back from the fleet: ensembles of predictions on the public proxy set.

Two protocols use it. In logit-only federated distillation (FedMD, DS-FL) clients keep
their models and upload top-k predictions on a proxy batch; the server averages them into
distillation targets for the next round. In teacher refinement (FedDF, FedGKT) the server
distils the fleet's averaged predictions back into the teacher, so a teacher trained on
few cloud users can learn from edge users it never sees. The proxy-only baseline uses
:func:`distill` with no private data at all.

Top-k labels are densified before averaging: each client's "rest" mass is spread evenly
over the items it did not list, which is the maximum-entropy reading of what it sent and
keeps every averaged row a distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedkd.distill import SoftLabels, kd_loss
from fedkd.local import ProxyBatch, set_state
from fedkd.train import train_step


def densify(sl: SoftLabels, num_items: int) -> np.ndarray:
    """(P, N + 1) float64 distribution; column 0 (padding) stays 0."""
    p, k = sl.ids.shape
    dense = np.zeros((p, num_items + 1))
    rest = np.clip(1.0 - sl.probs.astype(np.float64).sum(axis=1), 0.0, None)
    if num_items > k:
        dense[:, 1:] = (rest / (num_items - k))[:, None]
    np.put_along_axis(dense, sl.ids, sl.probs.astype(np.float64), axis=1)
    return dense / dense.sum(axis=1, keepdims=True)


def average(dists: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of dense (P, N + 1) distributions (uniform by default, as in DS-FL)."""
    if not dists:
        raise ValueError("no predictions to average")
    w = np.ones(len(dists)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    return sum(wi * d for wi, d in zip(w, dists))


def top_k(dense: np.ndarray, k: int) -> SoftLabels:
    """Top-k items of dense distributions (probabilities not renormalised, as the KD loss expects)."""
    probs = dense[:, 1:]
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return SoftLabels(ids=(idx + 1).astype(np.int64),
                      probs=np.take_along_axis(probs, idx, axis=1).astype(np.float32))


@torch.no_grad()
def predict_dense(model: torch.nn.Module, histories: np.ndarray, *, temperature: float) -> np.ndarray:
    """The model's full tempered distribution over real items, (P, N + 1) float64."""
    model.eval()
    z = model(torch.from_numpy(histories)).to(torch.float64)[:, 1:] / temperature
    out = torch.zeros(len(histories), z.shape[1] + 1, dtype=torch.float64)
    out[:, 1:] = torch.softmax(z, dim=1)
    return out.numpy()


def ensemble_of_states(model: torch.nn.Module, states: Sequence[Mapping[str, np.ndarray]],
                       histories: np.ndarray, *, temperature: float) -> np.ndarray:
    """Average prediction of many parameter states of one architecture (FedDF's ensemble)."""
    return average([_predict_with(model, s, histories, temperature) for s in states])


def _predict_with(model, state, histories, temperature):
    set_state(model, state)
    return predict_dense(model, histories, temperature=temperature)


def distill(model: torch.nn.Module, opt: torch.optim.Optimizer, proxy: ProxyBatch, *, steps: int,
            kd_batch_size: int, temperature: float, rng: np.random.Generator,
            private: tuple[np.ndarray, np.ndarray] | None = None, batch_size: int = 128) -> float:
    """``steps`` optimiser steps of T^2-scaled KD on proxy rows, plus CE on ``private`` samples if given.

    With ``private`` (the teacher's own cloud data during refinement) the model keeps
    fitting what it already knows while absorbing the fleet; without it (the proxy-only
    student) the soft labels are its only signal. Returns the mean loss.
    """
    losses = []
    for _ in range(steps):
        j = rng.choice(len(proxy.ids), size=min(kd_batch_size, len(proxy.ids)), replace=False)
        kd = (torch.from_numpy(proxy.histories[j]), torch.from_numpy(proxy.ids[j]),
              torch.from_numpy(proxy.probs[j]))
        if private is not None:
            i = rng.choice(len(private[1]), size=min(batch_size, len(private[1])), replace=False)
            losses.append(train_step(model, opt, torch.from_numpy(private[0][i]), torch.from_numpy(private[1][i]),
                                     kd=kd, kd_weight=1.0, temperature=temperature))
            continue
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = temperature ** 2 * kd_loss(model(kd[0]), kd[1], kd[2], temperature=temperature)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return float(np.mean(losses)) if losses else float("nan")
