"""Tests for fedkd.distill: teacher soft labels, their wire encoding, and the KD loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.distill import SoftLabels, decode_soft_labels, encode_soft_labels, kd_loss, teacher_soft_labels


def _labels_as_tensors(sl: SoftLabels) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(sl.ids), torch.from_numpy(sl.probs)


# --------------------------------------------------------------------------- teacher_soft_labels


def test_teacher_soft_labels_excludes_padding_and_matches_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 11)  # N = 10
    logits[:, 0] = 100.0  # padding would win every row if it were not excluded
    t = 2.0
    sl = teacher_soft_labels(logits, temperature=t, top_k=4)
    assert sl.ids.shape == (6, 4) and sl.ids.dtype == np.int64
    assert sl.probs.shape == (6, 4) and sl.probs.dtype == np.float32
    assert sl.ids.min() >= 1 and sl.ids.max() <= 10
    full = torch.softmax(logits[:, 1:] / t, dim=1).numpy()  # (6, 10) over items 1..10
    np.testing.assert_allclose(sl.probs, np.take_along_axis(full, sl.ids - 1, axis=1), rtol=1e-6)
    # Top-k and descending, not renormalised.
    np.testing.assert_allclose(sl.probs[:, 0], full.max(axis=1), rtol=1e-6)
    assert np.all(np.diff(sl.probs, axis=1) <= 0)
    assert np.all(sl.probs.sum(axis=1) <= 1 + 1e-6)
    assert np.all(sl.probs.sum(axis=1) < 0.99)  # 4 of 10 items cannot hold all the mass here


def test_teacher_soft_labels_full_k_sums_to_one() -> None:
    logits = torch.randn(3, 8)
    sl = teacher_soft_labels(logits, temperature=1.0, top_k=7)
    np.testing.assert_allclose(sl.probs.sum(axis=1), 1.0, atol=1e-6)
    assert all(sorted(row) == list(range(1, 8)) for row in sl.ids.tolist())


def test_teacher_soft_labels_hand_computed() -> None:
    # Items 1..3 logits [ln 1, ln 2, ln 5] at T=1 -> probs [0.125, 0.25, 0.625].
    logits = torch.tensor([[9.0, 0.0, math.log(2.0), math.log(5.0)]])
    sl = teacher_soft_labels(logits, temperature=1.0, top_k=2)
    np.testing.assert_array_equal(sl.ids, [[3, 2]])
    np.testing.assert_allclose(sl.probs, [[0.625, 0.25]], rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, 6, -1])
def test_teacher_soft_labels_rejects_bad_k(top_k: int) -> None:
    with pytest.raises(ValueError):
        teacher_soft_labels(torch.randn(2, 6), temperature=1.0, top_k=top_k)  # N = 5


def test_teacher_soft_labels_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError):
        teacher_soft_labels(torch.randn(2, 6), temperature=0.0, top_k=2)


def test_teacher_soft_labels_does_not_track_gradients() -> None:
    logits = torch.randn(2, 6, requires_grad=True)
    sl = teacher_soft_labels(logits, temperature=1.0, top_k=3)
    assert isinstance(sl.probs, np.ndarray)


# --------------------------------------------------------------------------- kd_loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("top_k", [1, 5, 20])  # 20 == N: no rest bin
def test_kd_loss_is_zero_for_perfect_student(temperature: float, top_k: int) -> None:
    torch.manual_seed(1)
    teacher = torch.randn(8, 21) * 3  # N = 20
    ids, probs = _labels_as_tensors(teacher_soft_labels(teacher, temperature=temperature, top_k=top_k))
    loss = kd_loss(teacher.clone(), ids, probs, temperature=temperature)
    assert loss.shape == ()
    assert abs(loss.item()) < 1e-6


def test_kd_loss_zero_even_if_student_padding_logit_differs() -> None:
    torch.manual_seed(2)
    teacher = torch.randn(4, 9)
    ids, probs = _labels_as_tensors(teacher_soft_labels(teacher, temperature=2.0, top_k=3))
    student = teacher.clone()
    student[:, 0] = 50.0
    assert abs(kd_loss(student, ids, probs, temperature=2.0).item()) < 1e-6


def test_kd_loss_zero_when_student_matches_on_coarse_bins() -> None:
    # The rest bin compares only total mass: shuffling the student's non-top logits
    # among themselves keeps the k+1-bin distribution and hence the loss at 0.
    teacher = torch.tensor([[0.0, 3.0, 2.0, 0.5, -1.0, 0.1]])
    ids, probs = _labels_as_tensors(teacher_soft_labels(teacher, temperature=1.0, top_k=2))
    student = teacher[:, [0, 1, 2, 4, 5, 3]]
    assert abs(kd_loss(student, ids, probs, temperature=1.0).item()) < 1e-6


def test_kd_loss_positive_and_decreasing_toward_teacher() -> None:
    torch.manual_seed(3)
    teacher = torch.randn(16, 31) * 2
    start = torch.randn(16, 31) * 2
    ids, probs = _labels_as_tensors(teacher_soft_labels(teacher, temperature=2.0, top_k=5))
    losses = [
        kd_loss((1 - a) * start + a * teacher, ids, probs, temperature=2.0).item() for a in (0.0, 0.3, 0.6, 0.9)
    ]
    assert losses[0] > 0.05
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] > 0


def test_kd_loss_gradient_descent_reduces_loss() -> None:
    torch.manual_seed(4)
    teacher = torch.randn(4, 12)
    ids, probs = _labels_as_tensors(teacher_soft_labels(teacher, temperature=1.0, top_k=3))
    student = torch.zeros(4, 12, requires_grad=True)
    first = kd_loss(student, ids, probs, temperature=1.0)
    for _ in range(60):  # plain SGD, lr 2 (torch.optim's first import alone costs seconds)
        (grad,) = torch.autograd.grad(kd_loss(student, ids, probs, temperature=1.0), student)
        with torch.no_grad():
            student -= 2.0 * grad
    assert kd_loss(student, ids, probs, temperature=1.0).item() < 0.01 * first.item()


def _kl(q: list[float], p: list[float]) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p) if qi > 0)


def test_kd_loss_hand_computed_k1() -> None:
    # Items 1..3 with student logits [1, 0, -1] at T = 2 -> tempered [0.5, 0, -0.5];
    # padding logit 7 must be ignored.  S = e^0.5 + 1 + e^-0.5.
    # Teacher sends item 2 with p = 0.5, so the rest bin is 0.5.
    # Student: p(item 2) = 1/S, p(rest) = (e^0.5 + e^-0.5)/S.
    # KL = 0.5 ln(0.5 / (1/S)) + 0.5 ln(0.5 / ((e^0.5 + e^-0.5)/S)).
    s = math.exp(0.5) + 1 + math.exp(-0.5)
    expected = 0.5 * math.log(0.5 * s) + 0.5 * math.log(0.5 * s / (math.exp(0.5) + math.exp(-0.5)))
    student = torch.tensor([[7.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    loss = kd_loss(student, torch.tensor([[2]]), torch.tensor([[0.5]], dtype=torch.float64), temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(0.0805, abs=1e-3)  # the hand arithmetic itself


def test_kd_loss_hand_computed_k2_batch_mean() -> None:
    # Row 1: logits [ln 1, ln 2, ln 5] at T = 1 -> student [0.125, 0.25, 0.625].
    #   Teacher: item 3 -> 0.5, item 1 -> 0.2, rest 0.3; student bins [0.625, 0.125, 0.25].
    # Row 2: uniform student [1/3, 1/3, 1/3]; teacher item 2 -> 0.9, item 1 -> 0.1, rest 0
    #   (the zero bin contributes nothing); student bins [1/3, 1/3, 1/3].
    row1 = _kl([0.5, 0.2, 0.3], [0.625, 0.125, 0.25])
    row2 = 0.9 * math.log(0.9 * 3) + 0.1 * math.log(0.1 * 3)
    student = torch.tensor([[0.0, 0.0, math.log(2.0), math.log(5.0)], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([[3, 1], [2, 1]])
    probs = torch.tensor([[0.5, 0.2], [0.9, 0.1]], dtype=torch.float64)
    loss = kd_loss(student, ids, probs, temperature=1.0)
    assert loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-10)


def test_kd_loss_renormalises_overshooting_teacher() -> None:
    # Quantised probs may sum above 1: [0.7, 0.5] -> teacher bins [7/12, 5/12, 0].
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # uniform 1/3
    loss = kd_loss(student, torch.tensor([[1, 2]]), torch.tensor([[0.7, 0.5]], dtype=torch.float64), temperature=1.0)
    expected = _kl([7 / 12, 5 / 12], [1 / 3, 1 / 3])
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert loss.item() >= 0


def test_kd_loss_full_k_undershooting_teacher_is_renormalised() -> None:
    # k = N = 2: no item is outside the top-k, so there is no rest bin even though the
    # (quantised) probs [0.5, 0.3] sum to 0.8 -> teacher bins [5/8, 3/8] vs student [1/2, 1/2].
    student = torch.tensor([[4.0, 1.0, 1.0]], dtype=torch.float64)
    loss = kd_loss(student, torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.3]], dtype=torch.float64), temperature=1.0)
    assert loss.item() == pytest.approx(_kl([5 / 8, 3 / 8], [0.5, 0.5]), rel=1e-10)


def test_kd_loss_gradient_only_to_student() -> None:
    torch.manual_seed(5)
    teacher_logits = torch.randn(3, 10, requires_grad=True)
    probs_np = torch.softmax(teacher_logits[:, 1:] / 2.0, dim=1)
    top = torch.topk(probs_np, 4, dim=1)
    ids = top.indices + 1
    probs = top.values  # still attached to teacher_logits' graph
    probs.retain_grad()
    student = torch.randn(3, 10, requires_grad=True)
    kd_loss(student, ids, probs, temperature=2.0).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad[:, 1:].abs().sum() > 0
    torch.testing.assert_close(student.grad[:, 0], torch.zeros(3))  # padding excluded
    assert teacher_logits.grad is None
    assert probs.grad is None


@pytest.mark.parametrize("top_k", [2, 6])  # 6 == N
def test_kd_loss_no_nan_with_zero_probabilities(top_k: int) -> None:
    student = torch.randn(2, 7, requires_grad=True)
    ids = torch.stack([torch.randperm(6)[:top_k] + 1 for _ in range(2)])
    probs = torch.zeros(2, top_k)
    probs[:, 0] = 0.6 if top_k < 6 else 1.0
    loss = kd_loss(student, ids, probs, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(student.grad).all()


def test_kd_loss_stable_for_extreme_logits() -> None:
    # Top-k holds essentially all mass: log(1 - sum) would be -inf / cancel; logsumexp does not.
    teacher = torch.tensor([[0.0, 80.0, 79.0, -80.0, -81.0]])
    ids, probs = _labels_as_tensors(teacher_soft_labels(teacher, temperature=1.0, top_k=2))
    student = teacher.clone().requires_grad_(True)
    loss = kd_loss(student, ids, probs, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item()) < 1e-6
    assert torch.isfinite(student.grad).all()


def test_kd_loss_rejects_padding_id_and_shape_mismatch() -> None:
    student = torch.randn(2, 5)
    with pytest.raises(ValueError):
        kd_loss(student, torch.tensor([[0, 1], [1, 2]]), torch.full((2, 2), 0.2), temperature=1.0)
    with pytest.raises(ValueError):
        kd_loss(student, torch.tensor([[1, 5], [1, 2]]), torch.full((2, 2), 0.2), temperature=1.0)  # N = 4
    with pytest.raises(ValueError):
        kd_loss(student, torch.tensor([[1, 2]]), torch.full((1, 2), 0.2), temperature=1.0)


# --------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize(("num_items", "dtype"), [(200, np.uint8), (255, np.uint8), (1682, np.uint16), (70000, np.uint32)])
def test_encode_id_dtype(num_items: int, dtype: type) -> None:
    ids = np.array([[num_items, 1]], dtype=np.int64)
    enc = encode_soft_labels(SoftLabels(ids, np.array([[0.5, 0.2]], np.float32)), bits=8, num_items=num_items)
    assert enc["ids"].dtype == dtype
    np.testing.assert_array_equal(decode_soft_labels(enc).ids, ids)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_encode_decode_round_trip_within_quantisation_error(bits: int) -> None:
    torch.manual_seed(6)
    n = 1682
    logits = torch.randn(32, n + 1) * 3
    sl = teacher_soft_labels(logits, temperature=2.0, top_k=20)
    enc = encode_soft_labels(sl, bits=bits, num_items=n)
    assert enc["ids"].dtype == np.uint16
    assert {"ids", "probs.data", "probs.scale", "probs.offset", "probs.shape", "probs.bits"} == set(enc)
    assert enc["probs.scale"].shape == (32,)  # per row
    dec = decode_soft_labels(enc)
    np.testing.assert_array_equal(dec.ids, sl.ids)
    assert dec.ids.dtype == np.int64 and dec.probs.dtype == np.float32
    # Nearest rounding: |error| <= scale/2 with scale = (row max - row min) / (2^bits - 1).
    half_step = (sl.probs.max(1) - sl.probs.min(1)) / (2**bits - 1) / 2  # (P,)
    err = np.abs(dec.probs - sl.probs)
    assert np.all(err <= half_step[:, None] * (1 + 1e-5) + 1e-9)
    # Deterministic: encoding twice gives the same bytes.
    np.testing.assert_array_equal(encode_soft_labels(sl, bits=bits, num_items=n)["probs.data"], enc["probs.data"])


def test_encode_decode_32_bits_exact_and_loss_zero() -> None:
    torch.manual_seed(7)
    teacher = torch.randn(5, 41)
    sl = teacher_soft_labels(teacher, temperature=1.5, top_k=6)
    enc = encode_soft_labels(sl, bits=32, num_items=40)
    assert enc["probs.data"].dtype == np.float32
    dec = decode_soft_labels(enc)
    np.testing.assert_array_equal(dec.probs, sl.probs)
    np.testing.assert_array_equal(dec.ids, sl.ids)
    ids, probs = _labels_as_tensors(dec)
    assert abs(kd_loss(teacher, ids, probs, temperature=1.5).item()) < 1e-6


def test_8_bit_labels_give_small_loss_for_perfect_student() -> None:
    torch.manual_seed(8)
    teacher = torch.randn(16, 101) * 2
    sl = teacher_soft_labels(teacher, temperature=2.0, top_k=10)
    ids, probs = _labels_as_tensors(decode_soft_labels(encode_soft_labels(sl, bits=8, num_items=100)))
    loss = kd_loss(teacher, ids, probs, temperature=2.0).item()
    assert 0 <= loss < 1e-3


def test_decode_rejects_inconsistent() -> None:
    sl = SoftLabels(np.array([[3, 1], [2, 4]], np.int64), np.array([[0.5, 0.2], [0.4, 0.1]], np.float32))
    good = encode_soft_labels(sl, bits=4, num_items=10)
    decode_soft_labels(good)  # sanity
    bad = dict(good, ids=good["ids"][:, :1])  # ids (2, 1) vs probs (2, 2)
    with pytest.raises(ValueError):
        decode_soft_labels(bad)
    bad = dict(good, ids=np.array([[3, 0], [2, 4]], np.uint8))  # padding id
    with pytest.raises(ValueError):
        decode_soft_labels(bad)
    bad = dict(good, ids=np.array([[3, 3], [2, 4]], np.uint8))  # duplicate id
    with pytest.raises(ValueError):
        decode_soft_labels(bad)
    bad = dict(good, **{"probs.shape": np.array([4], np.int64)})
    with pytest.raises(ValueError):
        decode_soft_labels(bad)
    bad = {k: v for k, v in good.items() if k != "probs.scale"}
    with pytest.raises(ValueError):
        decode_soft_labels(bad)


def test_encode_rejects_bad_input() -> None:
    sl = SoftLabels(np.array([[3, 1]], np.int64), np.array([[0.5, 0.2]], np.float32))
    with pytest.raises(ValueError):
        encode_soft_labels(sl, bits=3, num_items=10)
    with pytest.raises(ValueError):
        encode_soft_labels(sl, bits=8, num_items=2)  # id 3 > N
