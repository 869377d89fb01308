"""Full-ranking HR@k / NDCG@k with the user's history masked.

Sampled metrics (rank among 100 random negatives) are inconsistent with the full ranking
(Krichene & Rendle, 2020), so every target is ranked against all N items. Items the user
already consumed are masked, except the target itself: a repeat purchase is a legitimate
next item and must stay rankable. One function serves validation, test and any baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn


class EvalSetLike(Protocol):
    """What ranking needs from :class:`fedkd.samples.EvalSet` (kept structural to avoid a cycle)."""

    histories: np.ndarray  # (U, L) int64
    targets: np.ndarray  # (U,) int64
    seen: tuple[np.ndarray, ...]
    users: np.ndarray  # (U,)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: Sequence[np.ndarray]) -> np.ndarray:
    """0-based rank of each target among items 1..N after history masking.

    rank = number of unmasked items with a strictly higher score, so ties are counted
    optimistically (the target wins every tie). Models with continuous scores almost never
    tie; the popularity baseline does, and gets the benefit of the doubt.

    Parameters
    ----------
    scores : (B, N + 1) tensor; column 0 (padding) is ignored whatever its value.
    targets : (B,) int tensor of item ids in 1..N.
    seen : B arrays of earlier items to mask; the target is never masked.

    Returns
    -------
    (B,) int64 array of ranks.
    """
    B = scores.shape[0]
    if len(seen) != B or targets.shape != (B,):
        raise ValueError(f"scores has {B} rows, targets {tuple(targets.shape)}, seen {len(seen)}")
    scores = scores.detach().float().clone()  # we write -inf into it
    targets = torch.as_tensor(targets, device=scores.device).long()
    if B == 0:
        return np.zeros(0, dtype=np.int64)
    lens = np.fromiter((len(s) for s in seen), dtype=np.int64, count=B)
    rows = torch.from_numpy(np.repeat(np.arange(B, dtype=np.int64), lens)).to(scores.device)  # (M,)
    cols = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in seen])).to(scores.device)  # (M,)
    keep = cols != targets[rows]  # the target stays rankable even if consumed before
    scores[rows[keep], cols[keep]] = -torch.inf
    scores[:, 0] = -torch.inf
    target_score = scores.gather(1, targets[:, None])  # (B, 1)
    if torch.isnan(target_score).any():
        raise ValueError("NaN score for a target item")
    return (scores > target_score).sum(1).cpu().numpy().astype(np.int64)


def hit_ndcg(ranks: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-row HR@k (0/1) and NDCG@k (1 / log2(rank + 2) inside the top k, else 0).

    With one relevant item the ideal DCG is 1, so NDCG needs no normalisation.
    """
    ranks = np.asarray(ranks)
    hit = ranks < k
    ndcg = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return hit.astype(np.float64), ndcg


@dataclass(frozen=True)
class RankingResult:
    """Means plus per-user values, kept so tiers/clients can be compared and bootstrapped."""

    hr: float
    ndcg: float
    n: int
    per_user_hr: np.ndarray = field(repr=False)
    per_user_ndcg: np.ndarray = field(repr=False)
    users: np.ndarray = field(repr=False)


def score_ranking(scores_fn: Callable[[np.ndarray], torch.Tensor], ev: EvalSetLike, *, k: int = 10,
                  batch_size: int = 512) -> RankingResult:
    """Rank ``ev`` with any scorer ``histories (B, L) -> scores (B, N + 1)``, in batches
    so that the (B, N + 1) score matrix stays small for large catalogues."""
    hrs, ndcgs = [], []
    for start in range(0, len(ev.targets), batch_size):
        stop = start + batch_size
        scores = scores_fn(ev.histories[start:stop])  # (b, N + 1)
        targets = torch.as_tensor(ev.targets[start:stop], device=scores.device)
        hr, ndcg = hit_ndcg(target_ranks(scores, targets, ev.seen[start:stop]), k)
        hrs.append(hr)
        ndcgs.append(ndcg)
    per_hr = np.concatenate(hrs) if hrs else np.zeros(0)
    per_ndcg = np.concatenate(ndcgs) if ndcgs else np.zeros(0)
    n = len(per_hr)
    return RankingResult(hr=float(per_hr.mean()) if n else float("nan"),
                         ndcg=float(per_ndcg.mean()) if n else float("nan"),
                         n=n, per_user_hr=per_hr, per_user_ndcg=per_ndcg, users=np.asarray(ev.users))


def evaluate_ranking(model: nn.Module, ev: EvalSetLike, *, k: int = 10, batch_size: int = 512) -> RankingResult:
    """Rank with ``model`` in eval mode (no dropout) and leave its train/eval mode as found."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return score_ranking(lambda h: model(torch.as_tensor(h, dtype=torch.long, device=device)), ev,
                                 k=k, batch_size=batch_size)
    finally:
        model.train(was_training)
