"""What storing a student at a lower precision does to its weights, as a differentiable stand-in.

:func:`stored` rounds a weight as the exporter stores it (``fedkd.onnx_storage``): fp16 and
bf16 by a cast; int8 as the int8 file stores it: the item table symmetrically with one scale
per item row, every Linear weight symmetrically with one scale per tensor and the position
table as uint8 over its range (onnxruntime's ``quantize_dynamic``, QInt8 weights). int8 also
quantises activations: onnxruntime's dynamic quantisation maps the input of each MatMul to
uint8 with a per-tensor range of the batch at hand, which :func:`fake_precision` mimics on the
inputs of the Linear layers.

:func:`fake_precision` attaches these roundings to a model for quantisation-aware recovery
(:mod:`fedkd.recover`): the forward pass sees the stored weights, the backward pass treats
the rounding as the identity (the straight-through estimator), so the fp32 shadow weights
learn to survive their own rounding. It works through ``torch.nn.utils.prune``'s
reparametrisation (``prune.identity`` where a layer is not pruned): that makes ``weight`` a
plain attribute recomputed before each forward, which a second hook can then round; masks of
pruning and the rounding compose in that order, as in the exported file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["PRECISIONS", "fake_precision", "stored"]

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def _ste(w: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return w + (rounded - w).detach()


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``(q (R, C) int8, scale (R,) float32)``; an all-zero row gets
    scale 1. The scale is rounded to fp16 first, as it is stored, so ``q * scale`` here is
    bit for bit what the exported graph computes."""
    peak = w.detach().abs().amax(dim=1)  # (R,)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak)).to(torch.float16).to(torch.float32)
    q = torch.clamp(torch.round(w.detach() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def _int8_tensor(w: torch.Tensor) -> torch.Tensor:
    """onnxruntime's QInt8 weights of a MatMul: symmetric, scale ``max|w| / 127``, -127..127."""
    peak = w.detach().abs().max()
    scale = peak / 127 if peak > 0 else torch.ones_like(peak)
    return torch.clamp(torch.round(w.detach() / scale), -127, 127) * scale


def _uint8_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 over ``[min(x, 0), max(x, 0)]`` of the whole tensor: onnxruntime's
    DynamicQuantizeLinear of a MatMul input, and its quantised Gather tables (positions)."""
    lo, hi = torch.clamp(x.detach().min(), max=0), torch.clamp(x.detach().max(), min=0)
    scale = (hi - lo) / 255
    if scale == 0:
        return x.detach()
    zp = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x.detach() / scale) + zp, 0, 255) - zp) * scale


def stored(w: torch.Tensor, precision: str, *, role: str = "matmul") -> torch.Tensor:
    """``w`` as the file stores it, in float32 (no gradient path; see :func:`fake_precision`).
    ``role`` matters for int8 only: ``items`` (the item table, int8 per row), ``gather`` (another
    embedding table, uint8 per tensor) or ``matmul`` (a Linear weight, int8 per tensor)."""
    if precision == "fp32":
        return w
    if precision in ("fp16", "bf16"):
        return w.to(torch.float16 if precision == "fp16" else torch.bfloat16).to(w.dtype)
    if precision == "int8":
        if role == "items":
            q, scale = int8_rows(w)
            return q.to(w.dtype) * scale[:, None]
        return _uint8_range(w) if role == "gather" else _int8_tensor(w)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@contextmanager
def fake_precision(model: nn.Module, precision: str) -> Iterator[nn.Module]:
    """Inside the block ``model`` computes with its weights as stored at ``precision``
    (straight-through gradients); fp32 attaches nothing. Masks of pruning stay attached."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        yield model
        return
    handles, added = [], []
    item_emb = getattr(model, "item_emb", None)
    for module in model.modules():
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            continue
        if not hasattr(module, "weight_orig"):
            prune.identity(module, "weight")
            added.append(module)
        role = "items" if module is item_emb else "gather" if isinstance(module, nn.Embedding) else "matmul"

        def round_weight(mod: nn.Module, args: tuple, *, role: str = role) -> tuple | None:
            mod.weight = _ste(mod.weight, stored(mod.weight, precision, role=role))
            if precision == "int8" and role == "matmul":
                return (_ste(args[0], _uint8_range(args[0])),)
            return None

        handles.append(module.register_forward_pre_hook(round_weight))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for module in added:
            prune.remove(module, "weight")
