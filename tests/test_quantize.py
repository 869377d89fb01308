"""Tests for fedkd.quantize: packing, rounding error bounds, unbiasedness, wire format."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedkd.quantize import (
    QuantizedTensor,
    dequantize,
    dequantize_state,
    from_arrays,
    pack_bits,
    quantize,
    quantize_state,
    to_arrays,
    unpack_bits,
)


def _scale_per_element(q: QuantizedTensor) -> np.ndarray:
    """Broadcast the per-row / per-tensor scale back to the tensor's shape."""
    rows = q.scale.size
    count = int(np.prod(q.shape))
    return np.repeat(q.scale, count // rows).reshape(q.shape)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 3, 7, 13, 1001])
def test_pack_unpack_round_trip(bits: int, count: int) -> None:
    rng = np.random.default_rng(count)
    codes = rng.integers(0, 2**bits, size=count).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), codes)


def test_pack_bits_layout_hand_computed() -> None:
    # 2 bits, first code in the least significant bits: 1 | 2<<2 | 3<<4 | 0<<6 = 57; then 3 -> 3.
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3, 0, 3], dtype=np.uint8), 2), [57, 3])
    # 4 bits: 0xA | 0x5<<4 = 0x5A.
    np.testing.assert_array_equal(pack_bits(np.array([0xA, 0x5], dtype=np.uint8), 4), [0x5A])


def test_pack_bits_rejects_out_of_range_and_bad_bits() -> None:
    with pytest.raises(ValueError):
        pack_bits(np.array([4], dtype=np.uint8), 2)
    with pytest.raises(ValueError):
        pack_bits(np.array([1], dtype=np.uint8), 3)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros(2, dtype=np.uint8), 4, 5)  # 5 codes need 3 bytes


# --------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_row", [False, True])
def test_nearest_rounding_error_at_most_half_scale(bits: int, per_row: bool) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 7)) * rng.uniform(0.1, 10, size=(50, 1))).astype(np.float32)
    q = quantize(x, bits, per_row=per_row, stochastic=False)
    err = np.abs(dequantize(q) - x)
    bound = _scale_per_element(q) / 2 + 1e-6 * np.abs(x) + 1e-7  # float32 rounding slack
    assert np.all(err <= bound)
    # The bound is tight-ish: some element has error above a quarter step.
    assert np.any(err > _scale_per_element(q) / 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_error_below_scale(bits: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 9)).astype(np.float32)
    q = quantize(x, bits, per_row=True, stochastic=True, rng=rng)
    err = np.abs(dequantize(q) - x)
    assert np.all(err < _scale_per_element(q) + 1e-6 * np.abs(x))


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=64).astype(np.float32)
    x[0], x[1] = -1.0, 1.0  # pin the range so scale is the same for every draw
    n = 4000
    samples = np.stack([dequantize(quantize(x, 2, stochastic=True, rng=rng)) for _ in range(n)])
    scale = 2.0 / 3.0
    # Per element the rounding noise is Bernoulli * scale, std <= scale/2, so the
    # mean of n draws has std <= scale / (2 sqrt n); 5 sigma per element.
    tol = 5 * scale / (2 * np.sqrt(n))
    np.testing.assert_allclose(samples.mean(axis=0), x, atol=tol)
    # Nearest rounding of the same tensor is biased by much more than tol somewhere,
    # so this test would fail if stochastic rounding degenerated to nearest.
    nearest = dequantize(quantize(x, 2, stochastic=False))
    assert np.max(np.abs(nearest - x)) > 10 * tol


def test_stochastic_rounding_seeded_is_reproducible() -> None:
    x = np.linspace(-3, 5, 101, dtype=np.float32)
    a = quantize(x, 4, rng=np.random.default_rng(7))
    b = quantize(x, 4, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.data, b.data)


def test_hand_computed_per_tensor_codes() -> None:
    # min 0, max 3, 2 bits -> levels 3, scale 1; nearest codes are exactly x.
    x = np.array([[0.0, 1.0], [2.4, 3.0]], dtype=np.float32)
    q = quantize(x, 2, stochastic=False)
    np.testing.assert_array_equal(q.scale, [1.0])
    np.testing.assert_array_equal(q.offset, [0.0])
    np.testing.assert_array_equal(unpack_bits(q.data, 2, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(dequantize(q), [[0, 1], [2, 3]])


def test_per_row_uses_row_ranges() -> None:
    x = np.array([[0.0, 3.0], [10.0, 10.3]], dtype=np.float32)
    q = quantize(x, 2, per_row=True, stochastic=False)
    np.testing.assert_allclose(q.scale, [1.0, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(q.offset, [0.0, 10.0])
    np.testing.assert_allclose(dequantize(q), x, atol=1e-5)


# --------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
def test_32_bits_is_identity_bit_for_bit(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size:
        x.reshape(-1)[0] = np.float32(1e-40)  # denormal survives too
    q = quantize(x, 32, per_row=True)
    out = dequantize(q)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))
    assert q.scale.shape == (0,) and q.offset.shape == (0,)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_row", [False, True])
def test_constant_tensor_is_exact(bits: int, per_row: bool) -> None:
    x = np.full((4, 5), 0.1234567, dtype=np.float32)
    q = quantize(x, bits, per_row=per_row, rng=np.random.default_rng(0))
    assert np.all(q.scale == 0)
    np.testing.assert_array_equal(dequantize(q), x)


def test_zero_d_and_one_d_are_a_single_row() -> None:
    q0 = quantize(np.float32(2.5), 8, per_row=True, stochastic=False)
    assert q0.shape == () and q0.scale.shape == (1,)
    assert dequantize(q0) == np.float32(2.5)
    q1 = quantize(np.arange(6, dtype=np.float32), 8, per_row=True, stochastic=False)
    assert q1.scale.shape == (1,)


def test_rejects_bad_bits_and_non_finite() -> None:
    for bits in (1, 3, 16, 64):
        with pytest.raises(ValueError):
            quantize(np.zeros(3, dtype=np.float32), bits)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError):
            quantize(np.array([0.0, bad], dtype=np.float32), 8)
        with pytest.raises(ValueError):
            quantize(np.array([0.0, bad], dtype=np.float32), 32)


# --------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("bits", [2, 4, 8, 32])
@pytest.mark.parametrize("per_row", [False, True])
def test_to_from_arrays_round_trip(bits: int, per_row: bool) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 3)).astype(np.float32)
    q = quantize(x, bits, per_row=per_row, rng=rng)
    arrays = to_arrays(q)
    assert set(arrays) == {"data", "scale", "offset", "shape", "bits"}
    assert arrays["shape"].dtype == np.int64 and arrays["bits"].dtype == np.int64
    assert arrays["bits"].shape == ()
    back = from_arrays(arrays)
    assert back.bits == bits and back.shape == (7, 3)
    np.testing.assert_array_equal(dequantize(back), dequantize(q))


def _valid_arrays() -> dict[str, np.ndarray]:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    return to_arrays(quantize(x, 4, per_row=True, stochastic=False))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(bits=np.asarray(3, dtype=np.int64)),
        lambda d: d.update(bits=np.asarray(16, dtype=np.int64)),
        lambda d: d.update(data=d["data"][:-1]),  # truncated codes
        lambda d: d.update(data=np.concatenate([d["data"], d["data"][:1]])),  # extra byte
        lambda d: d.update(shape=np.asarray([5, 3], dtype=np.int64)),  # shape disagrees with data
        lambda d: d.update(scale=d["scale"][:2]),  # neither per-row (4) nor per-tensor (1)
        lambda d: d.update(offset=d["offset"][:1]),  # scale/offset disagree
        lambda d: d.update(data=d["data"].astype(np.int64)),
        lambda d: d.update(scale=np.full(4, np.nan, dtype=np.float32)),
        lambda d: d.pop("offset"),
    ],
)
def test_from_arrays_rejects_inconsistent(mutate) -> None:
    d = _valid_arrays()
    from_arrays(d)  # sanity: the unmutated message is accepted
    mutate(d)
    with pytest.raises(ValueError):
        from_arrays(d)


def test_from_arrays_rejects_inconsistent_32_bit() -> None:
    d = to_arrays(quantize(np.ones((2, 2), dtype=np.float32), 32))
    from_arrays(d)
    d["shape"] = np.asarray([3, 2], dtype=np.int64)
    with pytest.raises(ValueError):
        from_arrays(d)
    d = to_arrays(quantize(np.ones((2, 2), dtype=np.float32), 32))
    d["scale"] = np.ones(1, dtype=np.float32)
    with pytest.raises(ValueError):
        from_arrays(d)


def test_nbytes_8_bit_is_about_a_quarter_of_float32() -> None:
    x = np.random.default_rng(5).standard_normal((1000, 16)).astype(np.float32)
    q8 = quantize(x, 8, stochastic=False)
    q32 = quantize(x, 32)
    assert q32.nbytes() == 1000 * 16 * 4
    assert q8.nbytes() == 1000 * 16 + 4 + 4  # codes + one scale + one offset
    assert q8.nbytes() / q32.nbytes() == pytest.approx(0.25, abs=1e-3)
    # 2 bits packs four codes per byte.
    assert quantize(x, 2, stochastic=False).nbytes() == 1000 * 16 // 4 + 8
    # Per-row costs 8 bytes of scale/offset per row.
    assert quantize(x, 8, per_row=True, stochastic=False).nbytes() == 1000 * 16 + 1000 * 8


def test_state_round_trip_keeps_keys() -> None:
    rng = np.random.default_rng(6)
    state = {"emb.weight": rng.standard_normal((10, 4)).astype(np.float32), "bias": np.zeros(3, np.float32)}
    q = quantize_state(state, 8, per_row=True, stochastic=True, rng=rng)
    assert set(q) == set(state) and all(v.bits == 8 for v in q.values())
    out = dequantize_state(q)
    for name, value in state.items():
        assert out[name].shape == value.shape
        assert np.all(np.abs(out[name] - value) < _scale_per_element(q[name]) + 1e-6)


def test_quantise_is_fast() -> None:
    x = np.random.default_rng(8).standard_normal((1683, 64)).astype(np.float32)
    rng = np.random.default_rng(0)
    quantize(x, 4, per_row=True, rng=rng)  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        quantize(x, 4, per_row=True, rng=rng)
    per_call = (time.perf_counter() - start) / 5
    assert per_call < 0.05  # "a few ms" on a dev box; generous for loaded CI
