"""Uniform affine quantisation of model weights and updates for the wire.

Edge uplinks are the bottleneck of federated training, so tensors are sent as
low-bit integer codes plus a float32 ``scale``/``offset`` per row (or per
tensor).  Stochastic rounding keeps the dequantised value unbiased, which is
what lets the server average many noisy client updates without a systematic
drift; nearest rounding is offered for payloads that are used once (soft
labels) where the lower variance matters more than unbiasedness.

Everything here is vectorised numpy: a 1683x64 embedding table must quantise
and pack in a few milliseconds so that the simulator's cost is dominated by
training, not by the codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALLOWED_BITS",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "pack_bits",
    "unpack_bits",
    "to_arrays",
    "from_arrays",
    "quantize_state",
    "dequantize_state",
]

#: Bit widths that divide a byte (so codes never straddle bytes) plus the
#: float32 identity used as the uncompressed baseline.
ALLOWED_BITS: frozenset[int] = frozenset({2, 4, 8, 32})
_PACKABLE_BITS: frozenset[int] = frozenset({2, 4, 8})
_ARRAY_KEYS: tuple[str, ...] = ("data", "scale", "offset", "shape", "bits")


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as it travels on the wire.

    Attributes
    ----------
    bits : int
        2, 4, 8 or 32.  32 means "not quantised" so that the same message
        format carries the full-precision baseline.
    shape : tuple of int
        Original shape; needed because packed codes are 1-D.
    data : np.ndarray
        ``bits == 32``: float32 array of ``shape`` (identity).  Otherwise
        uint8 bit-packed codes (1-D, ``8 // bits`` codes per byte).
    scale : np.ndarray
        float32 step size per row ``(rows,)`` or per tensor ``(1,)``; empty
        ``(0,)`` when ``bits == 32``.
    offset : np.ndarray
        float32 minimum per row / per tensor; empty when ``bits == 32``.
    """

    bits: int
    shape: tuple[int, ...]
    data: np.ndarray
    scale: np.ndarray
    offset: np.ndarray

    def nbytes(self) -> int:
        """Payload size in bytes, the quantity the communication budget counts.

        The shape and bit width are a few bytes of header and are ignored so
        that the compression ratio reflects only what scales with the model.
        """
        return int(self.data.nbytes + self.scale.nbytes + self.offset.nbytes)


def _check_bits(bits: int, allowed: frozenset[int]) -> int:
    # bool is an int subclass; True would silently mean 1 bit.
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in allowed:
        raise ValueError(f"bits must be one of {sorted(allowed)}, got {bits!r}")
    return int(bits)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """Row split used for per-row statistics.

    Rows are the first axis because for embedding tables and linear weights
    that is the axis whose entries have their own dynamic range (one item /
    one output unit).  0-D and 1-D tensors are a single row.
    """
    if len(shape) <= 1:
        return 1, int(np.prod(shape, dtype=np.int64))
    return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))


def _packed_size(count: int, bits: int) -> int:
    per_byte = 8 // bits
    return -(-count // per_byte)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``< 2**bits`` into bytes, ``8 // bits`` per byte.

    Packing is what turns the nominal bit width into actual bytes saved; the
    first code occupies the least significant bits of each byte.

    Parameters
    ----------
    codes : np.ndarray
        Non-negative integer codes, any shape (flattened in C order).
    bits : int
        2, 4 or 8.

    Returns
    -------
    np.ndarray
        uint8, 1-D, ``ceil(codes.size * bits / 8)`` bytes; trailing slots of
        the last byte are zero.
    """
    bits = _check_bits(bits, _PACKABLE_BITS)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {flat.dtype}")
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    flat = flat.astype(np.uint8, copy=False)
    if bits == 8:
        return flat.copy()
    per_byte = 8 // bits
    n_bytes = _packed_size(flat.size, bits)
    padded = np.zeros(n_bytes * per_byte, dtype=np.uint8)
    padded[: flat.size] = flat
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)  # (per_byte,)
    # (n_bytes, per_byte) << (per_byte,): slots never overlap, so OR == sum.
    return np.bitwise_or.reduce(padded.reshape(n_bytes, per_byte) << shifts, axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    ``count`` is required because the padding slots of the last byte are
    indistinguishable from real zero codes.

    Returns
    -------
    np.ndarray
        uint8 codes, shape ``(count,)``.

    Raises
    ------
    ValueError
        If ``packed`` does not have exactly the number of bytes ``count``
        codes need (a truncated or padded message must not decode silently).
    """
    bits = _check_bits(bits, _PACKABLE_BITS)
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 array, got {packed.dtype} with shape {packed.shape}")
    expected = _packed_size(count, bits)
    if packed.size != expected:
        raise ValueError(f"{count} codes at {bits} bits need {expected} bytes, got {packed.size}")
    if bits == 8:
        return packed.copy()
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)  # (per_byte,)
    mask = np.uint8((1 << bits) - 1)
    codes = (packed[:, None] >> shifts) & mask  # (n_bytes, per_byte)
    return codes.reshape(-1)[:count].astype(np.uint8, copy=False)


def quantize(
    x: np.ndarray,
    bits: int,
    *,
    per_row: bool = False,
    stochastic: bool = True,
    rng: np.random.Generator | None = None,
) -> QuantizedTensor:
    """Quantise ``x`` to ``bits`` with a uniform affine grid.

    ``code = (x - min) / scale`` with ``scale = (max - min) / (2**bits - 1)``
    so the grid spans exactly the observed range and no code is wasted on
    values that do not occur.  Stochastic rounding (floor + Bernoulli(frac))
    makes ``E[dequantize(q)] == x``, so averaging many client updates does
    not accumulate rounding bias; nearest rounding halves the worst-case error
    when a payload is consumed once.

    Parameters
    ----------
    x : np.ndarray
        Finite numeric array of any shape; cast to float32, the training
        precision, so 32 bits reproduces the float32 tensor exactly.
    bits : int
        2, 4, 8 or 32 (identity).
    per_row : bool
        One scale/offset per first-axis row instead of per tensor; rows of an
        embedding table have very different ranges, so this costs 8 bytes a
        row but cuts the error for the small-norm rows.
    stochastic : bool
        Unbiased stochastic rounding (default) or deterministic nearest.
    rng : np.random.Generator or None
        Source of the rounding noise; pass a seeded generator for
        reproducible simulations.

    Returns
    -------
    QuantizedTensor

    Raises
    ------
    ValueError
        For bits outside {2, 4, 8, 32} or non-finite input (a NaN would
        poison min/max and hence every code in its row).
    """
    bits = _check_bits(bits, ALLOWED_BITS)
    arr = np.asarray(x, dtype=np.float32)
    shape = tuple(int(s) for s in arr.shape)
    if not np.all(np.isfinite(arr)):
        raise ValueError("cannot quantise a tensor with non-finite values")
    if bits == 32:
        empty = np.zeros(0, dtype=np.float32)
        return QuantizedTensor(bits=32, shape=shape, data=arr.copy(), scale=empty, offset=empty.copy())

    levels = (1 << bits) - 1
    rows, cols = _rows_cols(shape)
    if per_row:
        mat = arr.reshape(rows, cols)  # (rows, cols)
    else:
        mat = arr.reshape(1, -1)  # (1, size)
    n_groups, width = mat.shape
    if width == 0:
        lo = np.zeros(n_groups, dtype=np.float32)  # (groups,)
        hi = lo
    else:
        lo = mat.min(axis=1)  # (groups,)
        hi = mat.max(axis=1)  # (groups,)
    # float64 for the range so that max - min of large float32 values cannot
    # overflow; the stored float32 scale is what the receiver will use, so
    # codes are computed from it to keep encoder and decoder consistent.
    scale = ((hi.astype(np.float64) - lo.astype(np.float64)) / levels).astype(np.float32)  # (groups,)
    offset = lo.astype(np.float32)  # (groups,)
    scale64 = scale.astype(np.float64)[:, None]  # (groups, 1)
    safe = np.where(scale64 > 0, scale64, 1.0)  # (groups, 1)
    t = (mat.astype(np.float64) - offset.astype(np.float64)[:, None]) / safe  # (groups, width)
    t = np.where(scale64 > 0, t, 0.0)  # scale 0 -> every code 0 -> exactly min
    if stochastic:
        gen = rng if rng is not None else np.random.default_rng()
        floor = np.floor(t)
        codes = floor + (gen.random(t.shape) < (t - floor))
    else:
        codes = np.rint(t)
    codes = np.clip(codes, 0, levels).astype(np.uint8)  # (groups, width)
    return QuantizedTensor(bits=bits, shape=shape, data=pack_bits(codes, bits), scale=scale, offset=offset)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """Reconstruct the float32 tensor of ``q.shape``.

    Per-row versus per-tensor is read off ``scale.size`` so that the message
    needs no extra flag.
    """
    shape = tuple(q.shape)
    if q.bits == 32:
        return np.array(q.data, dtype=np.float32, copy=True).reshape(shape)
    _check_bits(q.bits, _PACKABLE_BITS)
    count = int(np.prod(shape, dtype=np.int64))
    codes = unpack_bits(q.data, q.bits, count)  # (count,)
    n_groups = int(q.scale.size)
    if n_groups == 0:
        return np.zeros(shape, dtype=np.float32)
    mat = codes.reshape(n_groups, -1).astype(np.float64)  # (groups, width)
    out = q.offset.astype(np.float64)[:, None] + mat * q.scale.astype(np.float64)[:, None]
    return out.astype(np.float32).reshape(shape)


def to_arrays(q: QuantizedTensor) -> dict[str, np.ndarray]:
    """Flatten to plain arrays so any array container (npz, a
    framework's parameter list) can carry it without knowing the dataclass."""
    return {
        "data": q.data,
        "scale": q.scale,
        "offset": q.offset,
        "shape": np.asarray(q.shape, dtype=np.int64).reshape(-1),
        "bits": np.asarray(q.bits, dtype=np.int64),
    }


def from_arrays(d: Mapping[str, np.ndarray]) -> QuantizedTensor:
    """Rebuild a :class:`QuantizedTensor` from :func:`to_arrays` output.

    Messages come from other parties, so every size is checked against the
    declared shape; a mismatch would otherwise surface as a confusing reshape
    error deep inside aggregation, or worse, decode to the wrong values.

    Raises
    ------
    ValueError
        Missing keys, bits not allowed, or sizes/dtypes inconsistent with
        ``shape``.
    """
    missing = [k for k in _ARRAY_KEYS if k not in d]
    if missing:
        raise ValueError(f"quantised tensor is missing keys {missing}")
    bits_arr = np.asarray(d["bits"])
    if bits_arr.size != 1 or not np.issubdtype(bits_arr.dtype, np.integer):
        raise ValueError(f"'bits' must be a single integer, got {bits_arr!r}")
    bits = int(bits_arr.reshape(()))
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {sorted(ALLOWED_BITS)}, got {bits}")
    shape_arr = np.asarray(d["shape"])
    if shape_arr.ndim != 1 or (shape_arr.size and not np.issubdtype(shape_arr.dtype, np.integer)):
        raise ValueError(f"'shape' must be a 1-D integer array, got {shape_arr!r}")
    if np.any(shape_arr < 0):
        raise ValueError(f"'shape' has negative dimensions: {shape_arr.tolist()}")
    shape = tuple(int(s) for s in shape_arr)
    count = int(np.prod(shape, dtype=np.int64))
    data = np.asarray(d["data"])
    scale = np.asarray(d["scale"])
    offset = np.asarray(d["offset"])

    if bits == 32:
        if data.dtype != np.float32:
            raise ValueError(f"32-bit data must be float32, got {data.dtype}")
        if data.size != count:
            raise ValueError(f"32-bit data has {data.size} values but shape {shape} needs {count}")
        if scale.size or offset.size:
            raise ValueError("32-bit tensors carry no scale/offset; got non-empty ones")
        empty = np.zeros(0, dtype=np.float32)
        return QuantizedTensor(bits, shape, data.reshape(shape).copy(), empty, empty.copy())

    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"{bits}-bit data must be 1-D uint8, got {data.dtype} with shape {data.shape}")
    expected = _packed_size(count, bits)
    if data.size != expected:
        raise ValueError(f"{count} codes at {bits} bits need {expected} bytes of data, got {data.size}")
    for name, arr in (("scale", scale), ("offset", offset)):
        if arr.dtype != np.float32 or arr.ndim != 1:
            raise ValueError(f"'{name}' must be 1-D float32, got {arr.dtype} with shape {arr.shape}")
    rows, _ = _rows_cols(shape)
    if scale.size != offset.size or scale.size not in (1, rows):
        raise ValueError(
            f"scale/offset sizes ({scale.size}, {offset.size}) must both be 1 (per tensor) "
            f"or {rows} (per row) for shape {shape}"
        )
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))):
        raise ValueError("scale/offset must be finite")
    if np.any(scale < 0):
        raise ValueError("scale must be non-negative")
    return QuantizedTensor(bits, shape, data.copy(), scale.copy(), offset.copy())


def quantize_state(
    state: Mapping[str, np.ndarray],
    bits: int,
    *,
    per_row: bool = False,
    stochastic: bool = True,
    rng: np.random.Generator | None = None,
) -> dict[str, QuantizedTensor]:
    """Quantise every tensor of a model state dict with one shared rng, so a
    seeded run draws the same rounding noise regardless of dict size."""
    gen = rng if rng is not None else np.random.default_rng()
    return {
        name: quantize(value, bits, per_row=per_row, stochastic=stochastic, rng=gen) for name, value in state.items()
    }


def dequantize_state(q: Mapping[str, QuantizedTensor]) -> dict[str, np.ndarray]:
    """Inverse of :func:`quantize_state` (up to rounding), keys preserved."""
    return {name: dequantize(value) for name, value in q.items()}
