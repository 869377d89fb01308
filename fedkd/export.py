"""Edge export of a trained student: TorchScript or ONNX files plus a tiny recommend API.

What the exported graph computes
--------------------------------
Every exported file holds the student *and* the last two steps of recommending, so a device
needs neither a sort nor a ``(N + 1)``-wide score buffer of its own::

    (history (B, L) int64, seen (B, S) int64, k) -> (scores (B, k) float32, ids (B, k) int64)

``history`` is left-padded with 0 to exactly ``L = max_len`` (most recent last). ``seen``
lists item ids to exclude, right-padded with 0 (any width ``S >= 1``; 0 is the padding column,
which is excluded anyway): the graph writes ``-inf`` into those columns and into column 0,
then runs TopK. ``k`` is a graph input (a 0-d int64 tensor in ONNX, an ``int`` in
TorchScript), not a constant baked in at export time.

Why this design, rather than exporting logits and doing masking + top-k in numpy:

* the seen set is a *graph input*, so masking is not traded away: it is a scatter of
  ``-inf`` before TopK, exact and cheap, and it can list items older than the window
  (``EvalSet.seen`` holds a user's whole past, not only the last ``L`` items);
* a device gets ``k`` ids and scores back instead of ``N + 1`` floats, and needs no sort
  (TopK is a standard op on every ONNX runtime, ``torch.topk`` in TorchScript);
* a dynamic ``k`` and a dynamic ``S`` cost nothing, so one file serves every caller.
  Positions beyond the items left unmasked come back with score ``-inf``; the
  :class:`Recommender` drops them (``recommend``) or returns id 0 there (``recommend_batch``).

The (B, N + 1) logits stay reachable in PyTorch (the model itself); the exported graph is
for serving.

Integrity: a sidecar ``<file>.json`` (see :func:`sidecar_path`) records what the file must
contain (kind, num_items, dim, max_len, format, precision, created, sha256 and size of the
model file). The same shape facts are embedded in the model file (ONNX ``metadata_props``,
TorchScript ``_extra_files``). :class:`Recommender` refuses a file whose sha256 differs from
the sidecar, whose embedded facts differ, or whose graph does not answer a probe with
exactly ``num_items`` rankable items: a device learns it got the wrong tensors at load
time, not from silently wrong recommendations.

Compression: ``export_onnx(precision=...)`` stores weights at fp32, fp16, bf16 or int8 and,
by default, stores zeros as bit masks (``fedkd.onnx_storage``), so a student pruned by
``fedkd.prune`` (and recovered by ``fedkd.recover``; ``fedkd.compress`` composes them) is a
smaller file with the same graph signature. The sidecar's ``storage`` lists how each rewritten
tensor is kept; ``fedkd export`` adds ``compression`` (what was pruned, recovered, on which data).

Loading is light: this module imports only the standard library and numpy at the top.
The ONNX path of :class:`Recommender` needs onnxruntime + numpy; the TorchScript path needs
``torch.jit.load``; neither imports fedkd.train, fedkd.models or Flower. Exporting needs
torch (and onnx + onnxruntime for ONNX files).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXPORT_SCHEMA", "PRECISIONS", "Recommender", "export_onnx", "export_torchscript", "read_sidecar",
           "sha256_file", "sidecar_path", "topk_module"]

EXPORT_SCHEMA = 1  # bump when the graph signature or the sidecar's meaning changes
_META_KEY = "fedkd_export"  # key of the embedded metadata (ONNX metadata_props / TorchScript extra file)
_SHAPE_KEYS = ("kind", "num_items", "dim", "blocks", "heads", "max_len")
_FORMATS = {".pt": "torchscript", ".onnx": "onnx"}
ONNX_OPSET = 17  # LayerNormalization is a native op from 17 on; onnxruntime >= 1.18 runs it


# --------------------------------------------------------------------------------------
# Files and metadata
# --------------------------------------------------------------------------------------

def sidecar_path(path: str | os.PathLike) -> Path:
    """``student.onnx`` -> ``student.onnx.json`` (next to the model file)."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of the model file ``path``; ValueError if missing or malformed."""
    side = sidecar_path(path)
    if not side.is_file():
        raise ValueError(f"{path}: no metadata sidecar {side.name} next to it; export with "
                         "fedkd.export.export_onnx / export_torchscript, which write one")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{side}: unreadable metadata sidecar ({e})") from e
    missing = [k for k in (*_SHAPE_KEYS, "format", "precision", "sha256", "schema") if k not in meta]
    if missing:
        raise ValueError(f"{side}: metadata sidecar lacks {', '.join(missing)}")
    if meta["schema"] != EXPORT_SCHEMA:
        raise ValueError(f"{side}: export schema {meta['schema']}, this fedkd reads schema {EXPORT_SCHEMA}")
    return meta


def _shape_meta(cfg: Any, max_len: int) -> dict[str, Any]:
    return {"kind": cfg.kind, "num_items": int(cfg.num_items), "dim": int(cfg.dim),
            "blocks": int(cfg.blocks), "heads": int(cfg.heads), "max_len": int(max_len)}


def _write_sidecar(path: Path, shape: dict[str, Any], fmt: str, precision: str, extra: dict[str, Any]) -> dict:
    meta = {"schema": EXPORT_SCHEMA, **shape, "format": fmt, "precision": precision,
            "file": path.name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": {"history": "(B, max_len) int64, left-padded with 0, most recent last",
                       "seen": "(B, S) int64 item ids to exclude, 0 = none",
                       "k": "number of items to return"},
            "outputs": {"scores": "(B, k) float32, -inf where no unmasked item is left",
                        "ids": "(B, k) int64 item ids, best first"},
            **extra}
    sidecar_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------------------
# Export (needs torch)
# --------------------------------------------------------------------------------------

def topk_module(model: Any):
    """Wrap a fedkd model ``(B, L) -> (B, N + 1)`` as the serving graph
    ``(history, seen, k) -> (scores, ids)`` described in the module docstring.

    Also the eager reference the exports are checked against.
    """
    import torch
    from torch import nn

    class TopKHead(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner

        def forward(self, history: torch.Tensor, seen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            scores = self.model(history)  # (B, N + 1)
            scores = scores.scatter(1, seen, float("-inf"))  # seen items (and 0-padding of seen) out
            scores[:, 0] = float("-inf")  # never recommend the padding id
            return torch.topk(scores, k, dim=1)  # (B, k) values, (B, k) int64 ids

    return TopKHead(model)


def _as_model(model: Any, config: Any = None):
    """A module, or a state dict plus a ModelConfig -> (eval-mode module, its ModelConfig)."""
    import torch

    if isinstance(model, Mapping):
        if config is None:
            raise ValueError("exporting a state dict needs config= (a fedkd.models.ModelConfig)")
        from fedkd.models import build_model  # only for a state dict; a module needs nothing

        module = build_model(config, seed=None)
        module.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in model.items()})
        return module.eval(), config
    cfg = config if config is not None else getattr(model, "cfg", None)
    if cfg is None or not all(hasattr(cfg, k) for k in ("kind", "num_items", "dim", "blocks", "heads", "max_len")):
        raise ValueError("model has no .cfg ModelConfig; pass config=")
    return model, cfg


def _check_max_len(max_len: Any, cfg: Any) -> int:
    if max_len is None:
        return int(cfg.max_len)
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    return int(max_len)


def _prepare(model: Any, config: Any, path: str | os.PathLike, max_len: Any, suffix: str, kind: str):
    """What every exporter checks before it writes: the file's suffix, the model and its window.
    Returns ``(path, module, cfg, max_len, shape metadata)``."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{kind} files end in {suffix}, got {path.name}")
    module, cfg = _as_model(model, config)
    max_len = _check_max_len(max_len, cfg)
    return path, module, cfg, max_len, _shape_meta(cfg, max_len)


@contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Export in eval mode (no dropout in the graph), then hand the caller's module back in the
    mode it came in: a training loop may export between steps."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _example(cfg: Any, max_len: int):
    import torch

    g = torch.Generator().manual_seed(0)
    hist = torch.randint(1, cfg.num_items + 1, (2, max_len), generator=g)
    hist[1, : max_len // 2] = 0  # some padding, so no path is specialised to full windows
    seen = torch.randint(0, cfg.num_items + 1, (2, 3), generator=g)
    return hist, seen


def export_torchscript(model: Any, path: str | os.PathLike, *, max_len: int | None = None,
                       config: Any = None) -> dict[str, Any]:
    """Write ``model`` as a TorchScript file (``.pt``) plus its sidecar; return the sidecar.

    The student is traced at window width ``max_len`` (default: the model's) with a dynamic
    batch, then wrapped in a scripted top-k head so ``k`` stays an ``int`` argument.
    ``model`` may be a module or a state dict (then ``config`` is its ModelConfig).
    """
    import torch

    path, module, cfg, max_len, shape = _prepare(model, config, path, max_len, ".pt", "TorchScript")
    with _eval_mode(module):
        hist, seen = _example(cfg, max_len)
        with torch.no_grad(), warnings.catch_warnings():
            # tracing warns about tuple unpacking of a fixed-size dim; torch 2.13 marks TorchScript
            # deprecated, but it is still what torch.jit.load-only devices run
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (hist,), check_trace=False)
            scripted = torch.jit.script(topk_module(traced))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.jit.save(scripted, str(path), _extra_files={_META_KEY: json.dumps(shape)})
    return _write_sidecar(path, shape, "torchscript", "fp32", {"torch": torch.__version__})


PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def export_onnx(model: Any, path: str | os.PathLike, *, max_len: int | None = None, int8: bool = False,
                precision: str | None = None, compact: bool = True, config: Any = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` as an ONNX file (``.onnx``) plus its sidecar; return the sidecar.

    Uses the TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs the
    ``onnxscript`` package, which fedkd does not depend on. Opset :data:`ONNX_OPSET`, a
    dynamic batch axis and a dynamic ``seen`` width; the window is fixed at ``max_len``.

    ``precision`` (``int8=True`` is ``precision="int8"``) is how the weights are stored:

    * ``fp32``: as trained;
    * ``fp16`` / ``bf16``: 16-bit initializers cast to float32 in the graph, computed in
      float32 (why: ``fedkd.onnx_storage``);
    * ``int8``: the item table, which is most of the student and is read twice (the history
      lookup and the tied output layer), once as int8 with one fp16 scale per item
      (``fedkd.onnx_storage.int8_item_table``); then ``onnxruntime.quantization.quantize_dynamic``
      (QInt8) quantises the remaining MatMul/Gather weights, activations quantised on the fly.

    ``compact`` (default) stores zeros as bit masks and shortens value names
    (``fedkd.onnx_storage``): lossless, and what makes a pruned student (``fedkd.prune``) a
    smaller file. ``compact=False`` with fp32 writes the exporter's file as it comes.
    ``extra`` is merged into the sidecar (``fedkd export`` records its compression there).
    """
    import onnx
    import torch

    from fedkd import onnx_storage

    precision = _check_precision(precision, int8)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"ONNX files end in .onnx, got {path.name}")
    module, cfg = _as_model(model, config)
    max_len = _check_max_len(max_len, cfg)
    shape = _shape_meta(cfg, max_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.stem + ".tmp.onnx")
    was_training = module.training
    module.eval()
    try:
        hist, seen = _example(cfg, max_len)
        with warnings.catch_warnings():
            # the legacy exporter announces its own deprecation and traces tuple unpacking
            warnings.simplefilter("ignore")
            torch.onnx.export(
                topk_module(module), (hist, seen, torch.tensor(10, dtype=torch.int64)), str(tmp_path),
                dynamo=False, opset_version=ONNX_OPSET, input_names=["history", "seen", "k"],
                output_names=["scores", "ids"], do_constant_folding=True,
                dynamic_axes={"history": {0: "batch"}, "seen": {0: "batch", 1: "num_seen"},
                              "scores": {0: "batch", 1: "k"}, "ids": {0: "batch", 1: "k"}})
    finally:
        module.train(was_training)
    extra = {"torch": torch.__version__, "onnx_opset": ONNX_OPSET, **(extra or {})}
    try:
        proto = onnx.load(str(tmp_path))
        storage: dict[str, dict] = {}
        if compact or precision != "fp32":
            onnx_storage.constants_to_initializers(proto)
        if precision in ("fp16", "bf16"):
            storage.update(onnx_storage.store_precision(proto, precision))
        elif precision == "int8":
            storage.update(onnx_storage.int8_item_table(proto, "model.item_emb.weight"))
            proto = _quantize_dynamic(proto, tmp_path)
            extra["onnxruntime_quantization"] = _ort_version()
        if compact:
            storage.update(onnx_storage.encode_zeros(proto))
            onnx_storage.minify_names(proto)
            extra["storage"] = {k: v for k, v in storage.items() if v["layout"] != "dense" or v["dtype"] != "float32"}
    finally:
        tmp_path.unlink(missing_ok=True)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(shape)
    proto.producer_name = "fedkd.export"
    onnx.save(proto, str(path))
    return _write_sidecar(path, shape, "onnx", precision, extra)


def _check_precision(precision: str | None, int8: bool) -> str:
    if precision is None:
        return "int8" if int8 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if int8 and precision != "int8":
        raise ValueError(f"int8=True contradicts precision={precision!r}")
    return precision


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _quantize_dynamic(proto: Any, tmp_path: Path) -> Any:
    """onnxruntime's dynamic int8 quantisation of ``proto`` (its MatMul and Gather weights)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_log = logging.getLogger()  # quantize_dynamic advises pre-processing through the root logger
    level = quant_log.level
    quant_log.setLevel(logging.ERROR)
    try:
        quantize_dynamic(proto, tmp_path, weight_type=QuantType.QInt8)
    finally:
        quant_log.setLevel(level)
    return onnx.load(str(tmp_path))


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------

class _OnnxBackend:
    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"{path}: onnxruntime cannot load it ({e})") from e
        names = [i.name for i in self.session.get_inputs()]
        if names != ["history", "seen", "k"]:
            raise ValueError(f"{path}: graph inputs {names}, expected ['history', 'seen', 'k']")
        props = self.session.get_modelmeta().custom_metadata_map
        self.embedded = json.loads(props[_META_KEY]) if _META_KEY in props else None
        self.history_shape = list(self.session.get_inputs()[0].shape)  # ['batch', L]

    def __call__(self, history: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.session.run(None, {"history": history, "seen": seen, "k": np.array(k, dtype=np.int64)})
        return scores, ids


class _TorchBackend:
    """TorchScript file (``torch.jit.load``) or, for references, an eager top-k module."""

    def __init__(self, module: Any, threads: int | None, embedded: dict | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.module = module
        self.embedded = embedded
        self.history_shape = None

    @classmethod
    def load(cls, path: Path, threads: int | None) -> _TorchBackend:
        import torch

        files = {_META_KEY: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError and friends
            raise ValueError(f"{path}: torch.jit.load cannot load it ({e})") from e
        raw = files[_META_KEY]
        embedded = json.loads(raw) if raw else None
        return cls(module.eval(), threads, embedded)

    def __call__(self, history: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            scores, ids = self.module(torch.from_numpy(history), torch.from_numpy(seen), k)
        return scores.numpy(), ids.numpy()


class Recommender:
    """Top-k recommendations from an exported student (``.pt`` TorchScript or ``.onnx``).

    ``Recommender(path)`` checks the file against its sidecar first (see the module
    docstring) and raises ValueError on any mismatch. ``threads`` caps the runtime's
    intra-op threads (None: the runtime's default; for TorchScript this is
    ``torch.set_num_threads``, which is process-wide).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, verify: bool = True) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such model file")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: empty model file (an interrupted copy or export?)")
        fmt = _FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{path}: unknown model format {path.suffix!r}; expected .pt or .onnx")
        meta = read_sidecar(path)
        if meta["format"] != fmt:
            raise ValueError(f"{path}: sidecar says format {meta['format']!r}, the file name says {fmt!r}")
        if verify:
            digest = sha256_file(path)
            if digest != meta["sha256"]:
                raise ValueError(f"{path}: sha256 {digest[:16]}... does not match the sidecar's "
                                 f"{meta['sha256'][:16]}...: the model file is not the one that was exported "
                                 "(tampered, truncated or swapped); re-export or re-copy both files")
        self.path, self.meta, self.format = path, meta, fmt
        self.num_items, self.max_len = int(meta["num_items"]), int(meta["max_len"])
        self._run = _OnnxBackend(path, threads) if fmt == "onnx" else _TorchBackend.load(path, threads)
        if verify:
            self._check_shapes()

    @classmethod
    def from_module(cls, model: Any, *, max_len: int | None = None, threads: int | None = None,
                    config: Any = None) -> Recommender:
        """The eager PyTorch reference: the same API over an in-memory model (no file, no
        checks). The model is switched to eval mode and stays there."""
        module, cfg = _as_model(model, config)
        module.eval()
        self = cls.__new__(cls)
        self.path, self.format = None, "pytorch"
        self.meta = {**_shape_meta(cfg, _check_max_len(max_len, cfg)), "format": "pytorch", "precision": "fp32"}
        self.num_items, self.max_len = int(cfg.num_items), int(self.meta["max_len"])
        self._run = _TorchBackend(topk_module(module), threads)
        return self

    # --- checks -----------------------------------------------------------------------
    def _check_shapes(self) -> None:
        where = f"{self.path}"
        emb = self._run.embedded
        if emb is None:
            raise ValueError(f"{where}: the model file carries no fedkd export metadata; was it exported "
                             "by fedkd.export?")
        wrong = [f"{k}: file {emb.get(k)!r} vs sidecar {self.meta[k]!r}" for k in _SHAPE_KEYS
                 if emb.get(k) != self.meta[k]]
        if wrong:
            raise ValueError(f"{where}: model file and sidecar disagree ({'; '.join(wrong)})")
        shape = self._run.history_shape
        if shape is not None and shape[1] != self.max_len:
            raise ValueError(f"{where}: graph input history is {shape}, sidecar max_len is {self.max_len}")
        # Probe: with nothing masked, top-(N + 1) must be every item 1..N once, then the padding
        # column at -inf. A bigger item table leaks ids > N; a smaller one cannot return N + 1.
        n = self.num_items
        hist = np.zeros((1, self.max_len), dtype=np.int64)
        hist[0, -1] = 1
        try:
            scores, ids = self._run(hist, np.zeros((1, 1), dtype=np.int64), n + 1)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{where}: the graph cannot rank {n} items as the sidecar says ({e})") from e
        ids = np.asarray(ids).ravel()
        scores = np.asarray(scores).ravel()
        if (ids.shape != (n + 1,) or ids[-1] != 0 or not np.isneginf(scores[-1])
                or not np.array_equal(np.sort(ids[:-1]), np.arange(1, n + 1)) or not np.isfinite(scores[:-1]).all()):
            raise ValueError(f"{where}: the graph does not score exactly the sidecar's {n} items "
                             "(mismatched item table)")

    # --- inputs -----------------------------------------------------------------------
    def _ids(self, x: Any, what: str, *, allow_pad: bool) -> np.ndarray:
        arr = np.asarray(x)
        if arr.size == 0:
            return arr.astype(np.int64).reshape(arr.shape)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{what} must hold integer item ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        lo = 0 if allow_pad else 1
        bad = (arr < lo) | (arr > self.num_items)
        if bad.any():
            raise ValueError(f"{what}: unknown item id {int(arr[bad][0])}; ids are 1..{self.num_items}"
                             + (" (0 = padding)" if allow_pad else ""))
        return arr

    def _window(self, histories: np.ndarray) -> np.ndarray:
        """(B, T) -> (B, max_len): keep the most recent ``max_len`` columns, left-pad with 0."""
        B, T = histories.shape
        L = self.max_len
        if T >= L:
            return np.ascontiguousarray(histories[:, T - L:])
        out = np.zeros((B, L), dtype=np.int64)
        out[:, L - T:] = histories
        return out

    def _seen(self, seen: Any, B: int) -> np.ndarray:
        if seen is None:
            return np.zeros((B, 1), dtype=np.int64)
        if isinstance(seen, np.ndarray) and seen.ndim == 2:
            if seen.shape[0] != B:
                raise ValueError(f"seen has {seen.shape[0]} rows for {B} histories")
            packed = self._ids(seen, "seen", allow_pad=True)
            return np.ascontiguousarray(packed) if packed.shape[1] else np.zeros((B, 1), dtype=np.int64)
        rows = [self._ids(np.asarray(s).ravel(), f"seen[{i}]", allow_pad=True) for i, s in enumerate(seen)]
        if len(rows) != B:
            raise ValueError(f"seen has {len(rows)} rows for {B} histories")
        width = max([1, *(len(r) for r in rows)])
        out = np.zeros((B, width), dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_items:
            raise ValueError(f"k must be an int in 1..{self.num_items}, got {k!r}")
        return int(k)

    # --- API --------------------------------------------------------------------------
    def topk(self, histories: Any, k: int = 10, seen: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (B, k) int64, scores (B, k) float32)``, best first.

        ``histories`` is ``(B, T)`` int with 0 as padding (any ``T``: the most recent
        ``max_len`` columns are kept, shorter rows are left-padded). ``seen`` is None
        (exclude nothing), ``B`` sequences of item ids, or a ``(B, S)`` array padded with 0.
        Where fewer than ``k`` items are left unmasked the id is 0 and the score ``-inf``.
        """
        hist = self._ids(histories, "histories", allow_pad=True)
        if hist.ndim != 2:
            raise ValueError(f"histories must be 2-D (B, L), got shape {hist.shape}")
        k = self._check_k(k)
        B = hist.shape[0]
        if B == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        scores, ids = self._run(self._window(hist), self._seen(seen, B), k)
        ids = np.where(np.isneginf(scores), 0, ids).astype(np.int64, copy=False)
        return ids, scores

    def recommend_batch(self, histories: Any, k: int = 10, seen: Any = None) -> np.ndarray:
        """``(B, k)`` int64 item ids, best first (0 where nothing unmasked is left); see :meth:`topk`."""
        return self.topk(histories, k, seen)[0]

    def recommend(self, history: Sequence[int], k: int = 10, exclude_seen: bool = True) -> list[int]:
        """The ``k`` best next items for one user's history (oldest first, most recent last).

        Every id must be in ``1..num_items`` (ValueError otherwise); an empty history is the
        cold-start case. With ``exclude_seen`` the whole history, not only the window, is
        excluded, so fewer than ``k`` ids come back only if the user has seen nearly everything.
        """
        items = self._ids(np.asarray(history).ravel() if len(history) else np.zeros(0, np.int64),
                          "history", allow_pad=False)
        seen = [np.unique(items)] if exclude_seen else None
        ids = self.recommend_batch(items[None, :], k, seen)[0]
        return [int(i) for i in ids if i != 0]

    def __repr__(self) -> str:
        return (f"Recommender({str(self.path)!r}, format={self.format}, precision={self.meta.get('precision')}, "
                f"num_items={self.num_items}, max_len={self.max_len})")
