"""Turn item sequences into fixed-width model inputs.

Models read a left-padded window of the most recent ``max_len`` items and
predict the next one from the last position.  Everything here is built with
one fancy-indexing gather over a flat buffer in which every sequence is
preceded by ``max_len`` zeros: a window that reaches past the start of its
sequence then reads padding instead of the previous user's items, so no
per-sample Python loop is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["EvalSet", "eval_set", "left_pad", "train_samples"]

_WHICH = ("valid", "test")


def _check_max_len(max_len: int) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    return int(max_len)


def left_pad(history: np.ndarray, max_len: int) -> np.ndarray:
    """Fit one history into the model's window.

    Returns
    -------
    numpy.ndarray
        (max_len,) int64: the last ``max_len`` items, most recent last, with
        zeros (the padding id) on the left when the history is shorter.
    """
    max_len = _check_max_len(max_len)
    items = np.asarray(history, dtype=np.int64).ravel()  # (T,)
    out = np.zeros(max_len, dtype=np.int64)  # (L,)
    tail = items[len(items) - min(len(items), max_len) :]
    out[max_len - len(tail) :] = tail
    return out


def _windows(
    sequences: Sequence[np.ndarray], cut: np.ndarray, max_len: int, *, every_prefix: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather the left-padded windows that end just before chosen positions.

    Parameters
    ----------
    sequences
        The sequences, each 1-D.
    cut
        (R,) per sequence: with ``every_prefix`` the number of leading items
        to skip as targets (targets are ``s[cut:]``); otherwise the single
        target index ``t`` of that sequence.
    every_prefix
        Emit every target position from ``cut`` on, rather than one.

    Returns
    -------
    tuple
        ``(histories (S, L), targets (S,), row_of_sample (S,))``.
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))  # (R,)
    if len(sequences) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros((0, max_len), dtype=np.int64), empty, empty
    # Flat buffer: [L zeros, s_0, L zeros, s_1, ...]
    block = lengths + max_len  # (R,)
    seq_start = np.cumsum(block) - lengths  # (R,) flat index of s_r[0]
    flat = np.zeros(int(block.sum()), dtype=np.int64)
    data = np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in sequences])  # (sum T,)
    data_start = np.cumsum(lengths) - lengths  # (R,) index of s_r[0] in data
    flat[np.repeat(seq_start - data_start, lengths) + np.arange(len(data))] = data

    if every_prefix:
        counts = np.maximum(lengths - cut, 0)  # (R,) targets per sequence
        row = np.repeat(np.arange(len(sequences)), counts)  # (S,)
        first = np.cumsum(counts) - counts  # (R,)
        offset = cut[row] + np.arange(int(counts.sum())) - first[row]  # (S,) index within sequence
    else:
        row = np.arange(len(sequences))
        offset = cut
    target_at = seq_start[row] + offset  # (S,) flat index of each target
    windows = np.lib.stride_tricks.sliding_window_view(flat, max_len)  # (F - L + 1, L) view
    return windows[target_at - max_len], flat[target_at], row  # row copy, no (S, L) index matrix


def train_samples(train_seqs: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand training sequences into (history, next item) pairs.

    Every prefix is a sample ("last-position CE on every prefix"): for each
    sequence ``s`` and ``t`` in ``1..len(s)-1`` the history is
    ``left_pad(s[:t], max_len)`` and the target ``s[t]``.  Samples are
    ordered by sequence, then by ``t``.  Sequences shorter than two items
    contribute nothing.

    Returns
    -------
    tuple
        ``(histories (S, L) int64, targets (S,) int64)``; shapes ``(0, L)``
        and ``(0,)`` when there are no samples.
    """
    max_len = _check_max_len(max_len)
    cut = np.ones(len(train_seqs), dtype=np.int64)  # (R,) the first item is never a target
    histories, targets, _ = _windows(train_seqs, cut, max_len, every_prefix=True)
    return histories, targets


@dataclass(frozen=True)
class EvalSet:
    """One held-out item per user, ready for full ranking."""

    histories: np.ndarray  # (U, L) int64 left-padded inputs
    targets: np.ndarray  # (U,) int64 held-out item
    seen: tuple[np.ndarray, ...]  # per row: ALL earlier items of that user (not only the last L) to mask in full ranking
    users: np.ndarray  # (U,) internal user index of each row


def eval_set(sequences: Sequence[np.ndarray], users: np.ndarray, which: str, max_len: int) -> EvalSet:
    """Build the validation or test rows for some users.

    Parameters
    ----------
    sequences
        Indexed by internal user index (``Dataset.sequences``), each with at
        least three items.
    users
        (U,) internal user indices, one row each, in this order.
    which
        ``"valid"``: history ``seq[:-2]``, target ``seq[-2]``; ``"test"``:
        history ``seq[:-1]``, target ``seq[-1]``, so the validation item is
        part of the test history, as in leave-one-out.
    max_len
        Window width ``L``.

    Raises
    ------
    ValueError
        Unknown ``which``, a bad ``max_len``, or a sequence too short.
    IndexError
        A user index outside ``sequences``.
    """
    if which not in _WHICH:
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    max_len = _check_max_len(max_len)
    rows = np.asarray(users, dtype=np.int64).ravel()  # (U,)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(sequences)):
        raise IndexError(f"user index out of range for {len(sequences)} sequences")
    chosen = [np.asarray(sequences[u]) for u in rows]
    short = [int(u) for u, s in zip(rows, chosen) if len(s) < 3]
    if short:
        raise ValueError(f"user {short[0]} has fewer than 3 items; cannot hold out valid and test")
    back = 2 if which == "valid" else 1
    target_index = np.fromiter((len(s) - back for s in chosen), dtype=np.int64, count=len(chosen))  # (U,)
    histories, targets, _ = _windows(chosen, target_index, max_len, every_prefix=False)
    seen = tuple(s[:t] for s, t in zip(chosen, target_index))
    return EvalSet(histories=histories, targets=targets, seen=seen, users=rows.copy())
