"""How an exported ONNX graph stores its tensors: precision, zeros, names. Lossless except
for the precision a caller asks for.

A device stores the file, so every byte of it counts, not the parameter count. Each pass
here rewrites an initializer ``X`` into smaller initializers plus a few nodes that rebuild
``X`` under its old name, so no consumer changes. onnxruntime constant-folds those nodes
when it loads the file (they depend on initializers only): the rebuilt tensors exist once,
in memory, and a request costs what it cost before.

Passes, applied by :func:`store` in this order:

1. **precision** (``fp16`` / ``bf16``): float initializers stored at 16 bits and cast back to
   float32 in the graph, so onnxruntime computes in float32 as before. Why a cast, not a
   16-bit graph: onnxconverter-common (the usual float16 converter) is not installed here;
   an fp16 graph would overflow the models' finite masks and floor scores
   (``finfo(float32).min``) to ``-inf``, and all-padding attention rows to NaN; onnxruntime
   1.32's CPU provider has no bf16 kernel for MatMul, Gemm, Add, Erf, Softmax or TopK
   (checked: the session is refused), while it runs Cast from bf16; and what a phone saves is
   the download and the flash, which 16-bit storage gives. A tensor with values outside
   fp16's range (the ``finfo.min / 2`` padding scores) stays float32.
   ``int8``: the item table as int8 with one fp16 scale per row (:func:`int8_item_table`),
   the rest through onnxruntime's ``quantize_dynamic`` (done by ``fedkd.export``).
2. **zeros** (:func:`encode_zeros`): a tensor whose zeros form whole rows (pruned items),
   whole columns (pruned dimensions) or scattered entries (pruned weights) is stored as a bit
   mask plus the kept rows, columns or values, whichever is smallest, and rebuilt with
   ``CumSum`` + ``Gather``. A mask costs one bit per row, column or entry.
3. **names** (:func:`minify_names`): the exporter's value names (``/model/blocks.0/attn/...``)
   are a sixth of a small student's file; they become short ids.
"""

from __future__ import annotations

import numpy as np

__all__ = ["constants_to_initializers", "encode_zeros", "int8_item_table", "minify_names", "store_precision"]

MADE = "fedkd."  # prefix of what the passes add: a later pass leaves those alone
OVERHEAD = 400  # bytes the ~10 rebuild nodes add to a file: a zero layout must save more than this
_FP16_MAX = 65504.0


class _Builder:
    """New initializers and nodes; the nodes go in front of the graph (they read initializers only)."""

    def __init__(self, proto) -> None:
        self.graph = proto.graph
        self.nodes: list = []
        self.names = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
        self.shared: dict[str, str] = {}
        self.made: set[str] = set()

    def fresh(self, hint: str) -> str:
        i, name = 0, hint
        while name in self.names:
            i += 1
            name = f"{hint}_{i}"
        self.names.add(name)
        return name

    def init(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(MADE + hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        self.made.add(name)
        return name

    def const(self, key: str, array: np.ndarray) -> str:
        if key not in self.shared:
            self.shared[key] = self.init(key, array)
        return self.shared[key]

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or self.fresh(MADE + op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def finish(self) -> None:
        for i, n in enumerate(self.nodes):
            self.graph.node.insert(i, n)
        self.nodes = []


def _initializers(proto) -> dict:
    return {t.name: t for t in proto.graph.initializer}


def _remove(proto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    t = _initializers(proto)[name]
    array = numpy_helper.to_array(t)
    proto.graph.initializer.remove(t)
    return array


def constants_to_initializers(proto, *, min_size: int = 16) -> None:
    """Constant nodes with at least ``min_size`` values become initializers, so the passes see
    them (the exporter folds the model's padding-score vector into a Constant)."""
    from onnx import numpy_helper

    for node in list(proto.graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        array = numpy_helper.to_array(node.attribute[0].t)
        if array.size >= min_size:
            proto.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            proto.graph.node.remove(node)


# --- zeros ------------------------------------------------------------------------------

def _layout(a: np.ndarray) -> tuple[str, np.ndarray, int]:
    """(layout, mask over the layout's unit, stored bytes) of the cheapest way to keep ``a``'s
    nonzeros; layout is dense | uniform | elements | rows | cols."""
    size = a.itemsize
    nz = a != 0
    options = [("dense", np.ones(1, bool), a.nbytes)]
    flat = nz.ravel()
    vals = a.ravel()[flat]
    options.append(("elements", flat, -(-a.size // 8) + vals.size * size))
    if vals.size and (vals == vals[0]).all():
        options.append(("uniform", flat, -(-a.size // 8) + size))
    if a.ndim == 2:
        rows, cols = nz.any(1), nz.any(0)
        options.append(("rows", rows, -(-len(rows) // 8) + int(rows.sum()) * a.shape[1] * size))
        options.append(("cols", cols, -(-len(cols) // 8) + int(cols.sum()) * a.shape[0] * size))
    best = min(options, key=lambda o: o[2])
    if best[0] != "dense" and a.nbytes - best[2] <= OVERHEAD:
        best = options[0]
    return best


def _unpack(b: _Builder, mask: np.ndarray, hint: str) -> str:
    """Nodes that turn the stored bit mask back into an int32 0/1 vector of ``len(mask)``."""
    from onnx import TensorProto

    bits = b.init(f"{hint}_bits", np.packbits(mask.astype(bool), bitorder="little"))
    x = b.node("Cast", [bits], to=TensorProto.INT32)  # (m,)
    x = b.node("Unsqueeze", [x, b.const("axis1", np.array([1], np.int64))])  # (m, 1)
    x = b.node("Div", [x, b.const("pow2", (2 ** np.arange(8, dtype=np.int32))[None, :])])  # (m, 8)
    x = b.node("Mod", [x, b.const("two", np.array(2, np.int32))])
    x = b.node("Reshape", [x, b.const("flat", np.array([-1], np.int64))])  # (8m,)
    return b.node("Slice", [x, b.const("zero1", np.array([0], np.int64)),
                            b.const(f"len{len(mask)}", np.array([len(mask)], np.int64))])  # (len,)


def _zeros_like_unit(b: _Builder, dtype: np.dtype, shape: tuple[int, ...]) -> str:
    from onnx import numpy_helper

    return b.node("ConstantOfShape", [b.const("shape_" + "x".join(map(str, shape)), np.array(shape, np.int64))],
                  value=numpy_helper.from_array(np.zeros(1, dtype)))


def _rebuild(b: _Builder, values: str, layout: str, mask: np.ndarray, shape: tuple[int, ...], dtype: np.dtype,
             out: str, hint: str) -> None:
    """``out`` = the full tensor from the kept ``values`` (already in ``dtype``) and the mask."""
    onoff = _unpack(b, mask, hint)
    if layout == "uniform":  # one stored value: the mask itself indexes [0, value]
        idx = onoff
    else:  # k-th kept unit -> k (1-based), a dropped one -> 0, the prepended zero
        idx = b.node("Mul", [b.node("CumSum", [onoff, b.const("axis0", np.array(0, np.int32))]), onoff])
    if layout in ("elements", "uniform"):
        table = b.node("Concat", [_zeros_like_unit(b, dtype, (1,)), values], axis=0)  # (nnz + 1,)
        b.node("Reshape", [b.node("Gather", [table, idx], axis=0), b.const("shape_" + "x".join(map(str, shape)),
                                                                            np.array(shape, np.int64))], out)
    elif layout == "rows":
        table = b.node("Concat", [_zeros_like_unit(b, dtype, (1, shape[1])), values], axis=0)  # (K + 1, C)
        b.node("Gather", [table, idx], out, axis=0)
    else:  # cols
        table = b.node("Concat", [_zeros_like_unit(b, dtype, (shape[0], 1)), values], axis=1)  # (R, C' + 1)
        b.node("Gather", [table, idx], out, axis=1)


def _kept(a: np.ndarray, layout: str, mask: np.ndarray) -> np.ndarray:
    if layout == "dense":
        return a
    if layout == "elements":
        return a.ravel()[mask]
    if layout == "uniform":
        return a.ravel()[mask][:1]
    return a[mask] if layout == "rows" else a[:, mask]


def encode_zeros(proto) -> dict[str, dict]:
    """Store every initializer (but those an earlier pass made) in its cheapest zero layout;
    returns what was done per tensor: ``{name: {layout, dtype, bytes_before, bytes_after}}``."""
    from onnx import numpy_helper

    b = _Builder(proto)
    done = {}
    for t in list(proto.graph.initializer):
        name = t.name
        if name.startswith(MADE):
            continue
        a = numpy_helper.to_array(t)
        if a.size < 64 or a.dtype.kind not in "fiu" or a.dtype.itemsize > 8:
            continue
        layout, mask, nbytes = _layout(a)
        if layout == "dense":
            continue
        _remove(proto, name)
        b.names.discard(name)
        values = b.init(f"{name}_kept", _kept(a, layout, mask))
        _rebuild(b, values, layout, mask, a.shape, a.dtype, name, name)
        done[name] = {"layout": layout, "dtype": str(a.dtype), "bytes_before": int(a.nbytes), "bytes_after": nbytes}
    b.finish()
    return done


# --- precision --------------------------------------------------------------------------

def _low(a: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        return a.astype(np.float16)
    import ml_dtypes  # numpy's bfloat16; onnx depends on it

    return a.astype(ml_dtypes.bfloat16)


def store_precision(proto, precision: str) -> dict[str, dict]:
    """fp16 / bf16: every float32 initializer of at least 16 values (and within range) stored
    at 16 bits and zero-encoded there, then cast to float32 in the graph."""
    from onnx import TensorProto, numpy_helper

    if precision not in ("fp16", "bf16"):
        raise ValueError(f"store_precision takes fp16 or bf16, got {precision!r}")
    b = _Builder(proto)
    done = {}
    for t in list(proto.graph.initializer):
        a = numpy_helper.to_array(t)
        if t.name.startswith(MADE) or a.dtype != np.float32 or a.size < 16 or not np.isfinite(a).all():
            continue
        if precision == "fp16" and np.abs(a).max() > _FP16_MAX:
            continue
        name = t.name
        _remove(proto, name)
        b.names.discard(name)
        low = _low(a, precision)
        layout, mask, nbytes = _layout(low)
        kept = b.init(f"{name}_{precision}", _kept(low, layout, mask))
        as32 = b.node("Cast", [kept], None if layout != "dense" else name, to=TensorProto.FLOAT)
        if layout != "dense":
            _rebuild(b, as32, layout, mask, a.shape, np.dtype(np.float32), name, name)
        done[name] = {"layout": layout, "dtype": precision, "bytes_before": int(a.nbytes), "bytes_after": nbytes}
    b.finish()
    return done


def int8_item_table(proto, name: str, table: np.ndarray | None = None) -> dict[str, dict]:
    """Replace the float32 item table ``name`` ``(N + 1, D)`` by int8 with a symmetric fp16
    scale per row (:func:`fedkd.precision.int8_rows`: the rounding recovery trained against),
    zero-encoded, cast and scaled back to float32 in the graph. Stored once, it serves both
    the history lookup and the tied output layer; left to ``quantize_dynamic`` it would be
    stored twice under one scale for the whole table. An all-zero row gets scale 1 and stays 0.
    Rows left out (pruned items) need no scale either."""
    import torch
    from onnx import TensorProto

    from fedkd.precision import int8_rows

    if name not in _initializers(proto):
        raise ValueError(f"ONNX graph has no initializer {name!r} to quantise")
    a = _remove(proto, name).astype(np.float32)
    q, scale = (x.numpy() for x in int8_rows(torch.from_numpy(a)))
    b = _Builder(proto)
    b.names.discard(name)
    layout, mask, nbytes = _layout(q)
    kept = b.init(f"{name}_int8", _kept(q, layout, mask))
    as32 = b.node("Cast", [kept], to=TensorProto.FLOAT)
    scale16 = scale.astype(np.float16)[:, None]  # (R, 1)
    if layout == "rows":  # scale the kept rows, then rebuild
        s = b.node("Cast", [b.init(f"{name}_scale", scale16[mask])], to=TensorProto.FLOAT)
        _rebuild(b, b.node("Mul", [as32, s]), layout, mask, a.shape, np.dtype(np.float32), name, name)
    else:
        full = as32
        if layout != "dense":
            full = b.fresh(f"{name}_q")
            _rebuild(b, as32, layout, mask, a.shape, np.dtype(np.float32), full, name)
        s = b.node("Cast", [b.init(f"{name}_scale", scale16)], to=TensorProto.FLOAT)
        b.node("Mul", [full, s], name)
    b.finish()
    stored = nbytes + (int(mask.sum()) if layout == "rows" else len(scale16)) * 2
    return {name: {"layout": layout, "dtype": "int8", "bytes_before": int(a.nbytes), "bytes_after": stored}}


# --- names ------------------------------------------------------------------------------

def minify_names(proto) -> None:
    """Short ids for every value that is not a graph input or output; node names and
    value_info dropped (onnxruntime needs neither)."""
    g = proto.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {""}
    mapping: dict[str, str] = {}
    counter = iter(range(1 << 31))

    def short(name: str) -> str:
        if name in keep:
            return name
        while name not in mapping:
            candidate = np.base_repr(next(counter), 36).lower()
            if candidate not in keep:  # an interface name ("k") is not free
                mapping[name] = candidate
        return mapping[name]

    for t in g.initializer:
        t.name = short(t.name)
    for n in g.node:
        n.name = ""
        n.doc_string = ""
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
    del g.value_info[:]
