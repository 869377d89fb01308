"""Pack a whole model state into three flat arrays for the wire.

Flower serialises every array with a few hundred bytes of framing, so a student sent
as one quantised array per tensor (data, scale, offset, shape, bits: ~50 arrays) would
spend more on framing than on 8-bit weights. Both ends build the same model, so the
layout (names, shapes, order) is known on both sides and only the values travel: one
blob of packed codes plus one scale and one offset per tensor. The receiver checks
every size against its own layout, so a malformed payload is refused with a reason
before anything touches the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedkd.quantize import QuantizedTensor, dequantize, quantize

Layout = Mapping[str, tuple[int, ...]]


# Why the server refused a reply: one named code per check, so rejections can be counted by
# cause (``metrics.csv`` has a ``rejected_<code>`` column per code) and every check is one
# mechanism: raise ``PayloadError(code, detail)``. docs/reliability.md explains each code.
REASONS: dict[str, str] = {
    "crashed": "the client raised an error instead of replying (Flower error reply)",
    "timeout": "no reply before round-timeout",
    "oversized": "the serialised reply is larger than max-reply-bytes allows",
    "undecodable": "an array's bytes cannot be decoded",
    "missing-key": "an expected array, metric or config entry is absent",
    "unexpected-key": "an array the protocol does not upload",
    "dtype": "an array has the wrong dtype",
    "shape": "an array has the wrong size or number of dimensions",
    "non-finite": "NaN or inf in a scale, offset, decoded value or reported loss",
    "malformed": "values that break the payload's invariants (negative scale, ids out of range, "
                 "probabilities outside [0, 1], a metric of the wrong type)",
    "steps": "the client reports more local steps than it was allowed (or fewer than 0)",
    "norm": "the update's L2 norm exceeds norm-reject times the round's median norm",
}


class PayloadError(ValueError):
    """A received payload is unusable. ``code`` names the check that failed (a key of
    :data:`REASONS`); the message says how, for the log and ``rejections.jsonl``."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in REASONS:
            raise ValueError(f"unknown rejection reason {code!r}; known: {', '.join(REASONS)}")
        super().__init__(detail)
        self.code, self.detail = code, detail


def layout_of(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def packed_len(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor for per-row scales: the first axis (0-D and 1-D tensors are one row)."""
    return int(shape[0]) if len(shape) > 1 else 1


def encode_state(state: Mapping[str, np.ndarray], *, bits: int, stochastic: bool,
                 rng: np.random.Generator | None = None, per_row: bool = False) -> dict[str, np.ndarray]:
    """Quantise every tensor with its own scale (or one per row) and concatenate the codes.

    ``bits == 32`` sends the float32 values untouched (the identity baseline). ``per_row``
    gives every first-axis row (an item's embedding) its own scale and offset: 8 bytes a
    row, worth it when rows differ in range.
    """
    if bits == 32:
        return {"values": np.concatenate([np.asarray(v, np.float32).ravel() for v in state.values()])}
    qs = [quantize(np.asarray(v, np.float32), bits, per_row=per_row, stochastic=stochastic, rng=rng)
          for v in state.values()]
    return {
        "codes": np.concatenate([q.data for q in qs]),                  # (sum packed,) uint8
        "scale": np.concatenate([q.scale for q in qs]).astype(np.float32),   # (T,) or (sum rows,)
        "offset": np.concatenate([q.offset for q in qs]).astype(np.float32),  # (T,) or (sum rows,)
    }


def decode_state(arrays: Mapping[str, np.ndarray], layout: Layout, *, bits: int,
                 per_row: bool = False) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_state`; raises :class:`PayloadError` naming what is wrong."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in layout.values()]
    if bits == 32:
        _expect_keys(arrays, {"values"})
        values = _expect(arrays, "values", np.float32, sum(sizes))
        _expect_finite(values, "values")
        out, start = {}, 0
        for (name, shape), n in zip(layout.items(), sizes):
            out[name] = values[start:start + n].reshape(shape).copy()
            start += n
        return out
    _expect_keys(arrays, {"codes", "scale", "offset"})
    packed = [packed_len(n, bits) for n in sizes]
    groups = [_rows(tuple(s)) if per_row else 1 for s in layout.values()]
    codes = _expect(arrays, "codes", np.uint8, sum(packed))
    scale = _expect(arrays, "scale", np.float32, sum(groups))
    offset = _expect(arrays, "offset", np.float32, sum(groups))
    _expect_finite(scale, "scale")
    _expect_finite(offset, "offset")
    if (scale < 0).any():
        raise PayloadError("malformed", "negative quantisation scale")
    out, start, g0 = {}, 0, 0
    for (name, shape), nbytes, g in zip(layout.items(), packed, groups):
        q = QuantizedTensor(bits=bits, shape=tuple(shape), data=codes[start:start + nbytes],
                            scale=scale[g0:g0 + g], offset=offset[g0:g0 + g])
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught just below
            out[name] = dequantize(q)
        _expect_finite(out[name], name)  # a finite but huge scale can still overflow float32
        start, g0 = start + nbytes, g0 + g
    return out


def kept_entries(layout: Layout, density: float) -> int:
    """Entries a sparse update keeps: ``ceil(density * size)``, at least one. Both ends derive it
    from the shared config, so the count never travels."""
    total = sum(int(np.prod(s, dtype=np.int64)) for s in layout.values())
    return max(1, min(total, math.ceil(density * total - 1e-9)))


def encode_update(update: Mapping[str, np.ndarray], *, bits: int, stochastic: bool,
                  rng: np.random.Generator | None = None, per_row: bool = False,
                  density: float = 1.0) -> dict[str, np.ndarray]:
    """An update as it goes up: dense (:func:`encode_state`) or, with ``density < 1``, top-k.

    Top-k keeps the ``kept_entries`` largest magnitudes over the whole model (ties by position)
    and sends their flat positions, bit-packed at ``bit_length(size - 1)`` bits and ascending,
    plus their values quantised together with one scale and offset (float32 at 32 bits). What
    it leaves out is lost unless error feedback carries it to the next round.
    """
    if density >= 1:
        return encode_state(update, bits=bits, stochastic=stochastic, rng=rng, per_row=per_row)
    flat = np.concatenate([np.asarray(v, np.float32).ravel() for v in update.values()])  # (n,)
    k = kept_entries(layout_of(update), density)
    index = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])  # (k,) ascending
    values = flat[index]
    out = {"index": pack_ids(index, flat.size - 1)}
    if bits == 32:
        return {**out, "values": values}
    q = quantize(values, bits, per_row=False, stochastic=stochastic, rng=rng)
    return {**out, "codes": q.data, "scale": q.scale, "offset": q.offset}


def decode_update(arrays: Mapping[str, np.ndarray], layout: Layout, *, bits: int, per_row: bool = False,
                  density: float = 1.0) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_update`; raises :class:`PayloadError` naming what is wrong."""
    if density >= 1:
        return decode_state(arrays, layout, bits=bits, per_row=per_row)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in layout.values()]
    n, k = sum(sizes), kept_entries(layout, density)
    _expect_keys(arrays, {"index", "values"} if bits == 32 else {"index", "codes", "scale", "offset"})
    index = unpack_ids(arrays["index"], (k,), n - 1)
    if k > 1 and not (np.diff(index) > 0).all():
        raise PayloadError("malformed", "sparse update positions must be strictly increasing")
    if bits == 32:
        values = _expect(arrays, "values", np.float32, k)
    else:
        codes = _expect(arrays, "codes", np.uint8, packed_len(k, bits))
        scale = _expect(arrays, "scale", np.float32, 1)
        offset = _expect(arrays, "offset", np.float32, 1)
        _expect_finite(scale, "scale")
        _expect_finite(offset, "offset")
        if (scale < 0).any():
            raise PayloadError("malformed", "negative quantisation scale")
        values = dequantize(QuantizedTensor(bits=bits, shape=(k,), data=codes, scale=scale, offset=offset))
    _expect_finite(values, "values")
    flat = np.zeros(n, np.float32)
    flat[index] = values
    out, start = {}, 0
    for (name, shape), size in zip(layout.items(), sizes):
        out[name] = flat[start:start + size].reshape(shape).copy()
        start += size
    return out


def _expect_keys(arrays: Mapping[str, np.ndarray], keys: set[str]) -> None:
    missing, extra = keys - set(arrays), set(arrays) - keys
    if missing:
        raise PayloadError("missing-key", f"wrong keys: missing {sorted(missing)}, unexpected {sorted(extra)}")
    if extra:
        raise PayloadError("unexpected-key", f"wrong keys: unexpected {sorted(extra)}")


def _expect(arrays: Mapping[str, np.ndarray], key: str, dtype: type, size: int) -> np.ndarray:
    a = arrays[key]
    if a.dtype != np.dtype(dtype):
        raise PayloadError("dtype", f"'{key}' has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.ndim != 1 or a.size != size:
        raise PayloadError("shape", f"'{key}' has shape {a.shape}, expected ({size},)")
    return a


def _expect_finite(a: np.ndarray, key: str) -> None:
    if not np.isfinite(a).all():
        raise PayloadError("non-finite", f"'{key}' holds non-finite values (NaN or inf)")


def id_bits(num_items: int) -> int:
    """Bits that hold item ids 0..num_items (11 for MovieLens-100K's 1,682 items)."""
    return max(1, int(num_items).bit_length())


def pack_ids(ids: np.ndarray, num_items: int) -> np.ndarray:
    """Bit-pack item ids at :func:`id_bits` bits each: lossless, and 31% smaller than uint16
    for MovieLens-100K. Proxy histories and soft-label ids are a fixed cost of every train
    message that no model quantisation shrinks."""
    b = id_bits(num_items)
    flat = np.asarray(ids, dtype=np.int64).ravel()
    if flat.size and (flat.min() < 0 or flat.max() > num_items):
        raise ValueError(f"item ids must lie in 0..{num_items}")
    bits = np.unpackbits(flat.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)[:, 32 - b:]  # (n, b)
    return np.packbits(bits.ravel())


def unpack_ids(packed: np.ndarray, shape: tuple[int, ...], num_items: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`; raises :class:`PayloadError` on a size mismatch."""
    b, n = id_bits(num_items), int(np.prod(shape, dtype=np.int64))
    if packed.dtype != np.uint8:
        raise PayloadError("dtype", f"packed ids have dtype {packed.dtype}, expected uint8")
    if packed.ndim != 1 or packed.size != -(-n * b // 8):
        raise PayloadError("shape", f"packed ids have dtype {packed.dtype} and shape {packed.shape}, expected "
                           f"uint8 ({-(-n * b // 8)},) for {n} ids of {b} bits")
    bits = np.unpackbits(packed)[: n * b].reshape(n, b)
    full = np.zeros((n, 32), np.uint8)
    full[:, 32 - b:] = bits
    ids = np.packbits(full, axis=1).view(">u4").ravel().astype(np.int64)
    if ids.size and ids.max() > num_items:
        raise PayloadError("malformed", f"packed ids exceed the catalogue size {num_items}")
    return ids.reshape(shape)
