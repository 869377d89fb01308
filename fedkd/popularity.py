"""Most-popular baseline: the floor any personalised model has to beat.

Counts come from training interactions only (never validation/test), so the baseline sees
exactly what the models see. Ranking it through :func:`fedkd.metrics.score_ranking` gives
it the same history masking as the models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def popularity_scores(train_seqs: Sequence[np.ndarray], num_items: int) -> torch.Tensor:
    """``(N + 1,)`` float32 interaction counts; column 0 (padding) gets a huge negative score
    so it never ranks, like the models' padding column."""
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in train_seqs]) if len(train_seqs) else np.zeros(0, np.int64)
    if items.size and (items.min() < 0 or items.max() > num_items):
        raise ValueError(f"item ids must lie in 0..{num_items}")
    counts = np.bincount(items, minlength=num_items + 1).astype(np.float32)  # (N + 1,)
    scores = torch.from_numpy(counts)
    scores[0] = torch.finfo(torch.float32).min / 2
    return scores


def popularity_scorer(train_seqs: Sequence[np.ndarray], num_items: int) -> Callable[[np.ndarray], torch.Tensor]:
    """Scorer for :func:`fedkd.metrics.score_ranking`: every history gets the same row."""
    scores = popularity_scores(train_seqs, num_items)

    def score(histories: np.ndarray) -> torch.Tensor:
        return scores.expand(len(histories), -1)  # (B, N + 1), a view: no copy per batch

    return score
