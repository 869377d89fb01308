"""Teacher soft labels and the knowledge-distillation loss.

The server distils its (larger) teacher into the clients by sending, for a
shared proxy batch of histories, only the teacher's top-k item probabilities
at temperature ``T``.  Sending k ids + k probabilities instead of N logits is
what makes edge distillation cheap on a catalogue of thousands of items.

Logit column 0 is the padding item: it is never a real recommendation, so it
is excluded from every softmax here, on both the teacher and student side;
otherwise the padding logit would leak probability mass into the KL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedkd.quantize import dequantize, from_arrays, quantize, to_arrays

__all__ = [
    "SoftLabels",
    "teacher_soft_labels",
    "encode_soft_labels",
    "decode_soft_labels",
    "kd_loss",
]

_PROBS_PREFIX = "probs."
# Dequantised probabilities can exceed 1 by float rounding of offset + code*scale.
_PROB_SLACK = 1e-5


@dataclass(frozen=True)
class SoftLabels:
    """Top-k teacher distribution for a proxy batch.

    Attributes
    ----------
    ids : np.ndarray
        (P, k) int64 item ids in 1..N, by descending teacher probability.
    probs : np.ndarray
        (P, k) float32 teacher probabilities ``softmax(logits / T)`` over
        items 1..N, *not* renormalised: ``1 - probs.sum(1)`` is the mass the
        teacher puts outside the top-k, which the KD loss needs for its
        "rest" bin.
    """

    ids: np.ndarray
    probs: np.ndarray


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def teacher_soft_labels(logits: torch.Tensor, *, temperature: float, top_k: int) -> SoftLabels:
    """Top-k of the teacher's tempered distribution over real items.

    Parameters
    ----------
    logits : torch.Tensor
        (P, N+1) teacher logits; column 0 is padding and is excluded.
    temperature : float
        Softening temperature ``T > 0``; larger T exposes more of the
        teacher's ranking among non-top items ("dark knowledge").
    top_k : int
        Number of items to send, ``1 <= top_k <= N``.

    Returns
    -------
    SoftLabels
        Computed without autograd: soft labels are data sent on the wire,
        never a path for gradients back into the teacher.

    Raises
    ------
    ValueError
        Bad shape, temperature or ``top_k``, or non-finite logits.
    """
    t = _check_temperature(temperature)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (P, N+1) with N >= 1, got shape {tuple(logits.shape)}")
    n_items = logits.shape[1] - 1
    if isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= int(top_k) <= n_items:
        raise ValueError(f"top_k must be an integer in [1, {n_items}], got {top_k!r}")
    k = int(top_k)
    with torch.no_grad():
        z = logits.detach()[:, 1:].to(torch.float64)  # (P, N)
        if not torch.isfinite(z).all():
            raise ValueError("teacher logits must be finite")
        p = torch.softmax(z / t, dim=1)  # (P, N), float64 so the tail mass is accurate
        vals, idx = torch.topk(p, k, dim=1, largest=True, sorted=True)  # (P, k)
    ids = (idx + 1).cpu().numpy().astype(np.int64)  # shift past the padding column
    probs = vals.cpu().numpy().astype(np.float32)
    return SoftLabels(ids=ids, probs=probs)


def _id_dtype(num_items: int) -> np.dtype:
    if num_items <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if num_items <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if num_items <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"num_items={num_items} does not fit in uint32")


def encode_soft_labels(sl: SoftLabels, *, bits: int, num_items: int) -> dict[str, np.ndarray]:
    """Serialise soft labels into the smallest arrays that preserve them.

    Ids go in the narrowest unsigned dtype holding ``num_items`` (uint16 for
    MovieLens-100k's 1682 items halves the id bytes versus uint32).  Probs are
    quantised per row with deterministic nearest rounding: each label is used
    once, so lower variance beats unbiasedness, and rows differ in range
    (confident vs. flat teacher rows).

    Parameters
    ----------
    sl : SoftLabels
    bits : int
        2, 4, 8, or 32 (float32, exact).
    num_items : int
        Catalogue size N; every id must lie in 1..N.

    Returns
    -------
    dict of str to np.ndarray
        ``"ids"`` plus the probs' :func:`fedkd.quantize.to_arrays` keys
        prefixed with ``"probs."``.
    """
    ids = np.asarray(sl.ids)
    probs = np.asarray(sl.probs, dtype=np.float32)
    if ids.ndim != 2 or ids.shape != probs.shape:
        raise ValueError(f"ids and probs must be equal (P, k) shapes, got {ids.shape} and {probs.shape}")
    num_items = int(num_items)
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if ids.size and (ids.min() < 1 or ids.max() > num_items):
        raise ValueError(f"ids must lie in [1, {num_items}] (0 is padding)")
    if bits not in (2, 4, 8, 32):
        raise ValueError(f"bits must be one of [2, 4, 8, 32], got {bits!r}")
    q = quantize(probs, bits, per_row=True, stochastic=False)
    out: dict[str, np.ndarray] = {"ids": ids.astype(_id_dtype(num_items))}
    out.update({_PROBS_PREFIX + key: value for key, value in to_arrays(q).items()})
    return out


def decode_soft_labels(d: Mapping[str, np.ndarray]) -> SoftLabels:
    """Inverse of :func:`encode_soft_labels`.

    Validates what the loss relies on, because a malformed message would
    otherwise give NaN or silently wrong gradients on the client: matching
    shapes, ids >= 1 and unique per row, probabilities finite in [0, 1].

    Raises
    ------
    ValueError
        On any inconsistency.
    """
    if "ids" not in d:
        raise ValueError("soft labels are missing key 'ids'")
    ids = np.asarray(d["ids"])
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D (P, k), got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.unsignedinteger):
        raise ValueError(f"ids must be an unsigned integer array, got {ids.dtype}")
    prob_arrays = {k[len(_PROBS_PREFIX):]: v for k, v in d.items() if k.startswith(_PROBS_PREFIX)}
    probs = dequantize(from_arrays(prob_arrays))
    if probs.shape != ids.shape:
        raise ValueError(f"probs shape {probs.shape} does not match ids shape {ids.shape}")
    if ids.size:
        if ids.min() < 1:
            raise ValueError("ids must be >= 1 (0 is padding)")
        srt = np.sort(ids, axis=1)  # (P, k)
        if np.any(srt[:, 1:] == srt[:, :-1]):
            raise ValueError("ids must be unique within each row")
        if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1 + _PROB_SLACK:
            raise ValueError("probs must be finite and in [0, 1]")
    return SoftLabels(ids=ids.astype(np.int64), probs=probs.astype(np.float32))


def kd_loss(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher || student) over k+1 bins: the k top items and a "rest" bin.

    The rest bin holds the mass outside the top-k.  Restricting to the top-k
    alone would never push the student's mass *off* non-top items, while
    comparing the full student distribution against a truncated teacher is
    never zero even for a perfect student; the k+1-bin KL is zero exactly
    when the student agrees with the teacher on everything that was sent.

    Teacher bins are ``probs`` and ``clamp(1 - sum(probs), min=0)``.  If
    quantisation noise pushes ``sum(probs)`` above 1 the bins are divided by
    that sum so that the teacher is still a distribution and the KL stays
    >= 0; for sums <= 1 this is a no-op.  Rows with no non-top item (k = N)
    get a zero rest bin (float error in ``1 - sum`` would otherwise be
    compared against a student rest mass of exactly 0) and their top-k bins
    are divided by their sum.

    Student bins are ``softmax(student_logits[:, 1:] / T)`` at ``ids`` and
    the remaining mass, all in log space (the rest bin via a logsumexp over
    the non-top logits, not ``log(1 - sum)``, which cancels catastrophically
    when the top-k holds nearly all the mass).

    Parameters
    ----------
    student_logits : torch.Tensor
        (B, N+1) student logits; column 0 is padding and excluded.
    ids : torch.Tensor
        (B, k) integer item ids in 1..N, unique per row.
    probs : torch.Tensor
        (B, k) teacher probabilities (not renormalised).  Treated as a
        constant: no gradient flows into it.
    temperature : float
        Same T the labels were made with.  The caller scales by ``T**2``.

    Returns
    -------
    torch.Tensor
        Scalar, mean over the batch.
    """
    t = _check_temperature(temperature)
    if student_logits.ndim != 2 or student_logits.shape[1] < 2:
        raise ValueError(f"student_logits must be (B, N+1) with N >= 1, got {tuple(student_logits.shape)}")
    b, n_plus_1 = student_logits.shape
    if ids.ndim != 2 or ids.shape[0] != b or probs.shape != ids.shape:
        raise ValueError(
            f"ids and probs must be (B, k) with B={b}; got {tuple(ids.shape)} and {tuple(probs.shape)}"
        )
    if b == 0:
        raise ValueError("kd_loss needs a non-empty batch")
    ids = ids.to(device=student_logits.device, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 1 or int(ids.max()) >= n_plus_1):
        raise ValueError(f"ids must lie in [1, {n_plus_1 - 1}] (0 is padding)")
    dtype = student_logits.dtype
    q_top = probs.detach().to(device=student_logits.device, dtype=dtype).clamp(min=0)  # (B, k)

    z = student_logits / t  # (B, N+1)
    # Shift by the (constant) row max of the real items: log-probabilities are
    # shift invariant, and subtracting first keeps float32 precision when
    # logits are large (80 - 80.31 loses ~1e-5 to the ulp of 80).
    z = z - z[:, 1:].max(dim=1, keepdim=True).values.detach()  # (B, N+1)
    log_z_all = torch.logsumexp(z[:, 1:], dim=1, keepdim=True)  # (B, 1), padding excluded
    log_p_top = z.gather(1, ids) - log_z_all  # (B, k)

    non_top = torch.ones_like(z, dtype=torch.bool)  # (B, N+1)
    non_top[:, 0] = False
    non_top.scatter_(1, ids, False)
    has_rest = non_top.any(dim=1, keepdim=True)  # (B, 1)
    # Rows without a rest bin get a finite dummy in the padding column so that
    # logsumexp (and its gradient) is never taken over all -inf, which gives
    # NaN gradients; their teacher rest mass is 0 so the dummy never counts.
    dummy = torch.zeros_like(non_top)
    dummy[:, 0] = True
    rest_logits = z.masked_fill(~non_top, float("-inf"))
    rest_logits = rest_logits.masked_fill(dummy & ~has_rest, 0.0)  # (B, N+1)
    log_p_rest = torch.logsumexp(rest_logits, dim=1, keepdim=True) - log_z_all  # (B, 1)

    top_sum = q_top.sum(dim=1, keepdim=True)  # (B, 1)
    q_rest = torch.where(has_rest, (1 - top_sum).clamp(min=0), torch.zeros_like(top_sum))  # (B, 1)
    # With a rest bin the total is max(top_sum, 1): 1 unless quantisation
    # overshoots.  Without one (k = N) the top-k is the whole distribution.
    total = torch.where(has_rest, top_sum.clamp(min=1.0), top_sum.clamp(min=torch.finfo(dtype).tiny))  # (B, 1)
    q = torch.cat([q_top, q_rest], dim=1) / total  # (B, k+1)
    log_p = torch.cat([log_p_top, log_p_rest], dim=1)  # (B, k+1)

    # xlogy gives 0 * log 0 = 0, so zero-probability bins contribute nothing.
    kl = torch.xlogy(q, q) - q * log_p  # (B, k+1)
    return kl.sum(dim=1).mean()
