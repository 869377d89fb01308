"""Pruning a trained student: magnitude pruning of weights, of item rows, of embedding dimensions.

Every kind goes through :mod:`torch.nn.utils.prune`, not hand-written masking, because its
reparametrisation (``weight = weight_orig * weight_mask``, recomputed before every forward)
is exactly what recovery needs: a fine-tune after pruning (:mod:`fedkd.recover`) updates
``weight_orig`` while the pruned entries stay zero, with no hook of our own to forget.
:func:`make_permanent` then folds the masks into plain tensors for export.

Kinds, each at a requested ``sparsity`` in ``[0, 1)``:

``weights``
    unstructured: in every weight matrix (the item and position tables, every Linear) the
    ``round(sparsity * n)`` entries of smallest magnitude become zero
    (``prune.l1_unstructured``, one tensor at a time). Per tensor, not one global threshold:
    the tables and the transformer's matrices live on different scales, and a global cut
    would empty the small matrices first.
``rows``
    structured: the item-table rows of the ``round(sparsity * N)`` items with the smallest
    L2 norm are removed (:class:`ItemRows`). The padding row 0 is zero anyway and never
    counts. The item table is both the input lookup and the tied output layer, so a pruned
    item has no embedding at all. **Decision**: a pruned item is *ranked last*, below every
    kept item, not at the score 0 its zero row would give it (which would rank it among the
    kept items at random). Its score is the padding column's ``finfo.min / 2`` (added by a
    forward hook, :func:`_floor_pruned_items`): finite, so losses stay finite and the exported
    graph still ranks all ``N`` items (the ``Recommender`` probe holds, the file format is
    unchanged), yet no kept item can fall below it. A pruned target therefore counts as a
    miss whenever ``k`` is below the number of kept unseen items, in PyTorch and in the
    exported file alike; a pruned item in a history contributes only its position.
``dims``
    structured: the ``round(sparsity * D)`` columns of the item table with the smallest L2
    norm (``prune.ln_structured`` on dim 1). The transformer keeps its width: a removed
    column neither feeds the input nor scores the output.

What counts is the stored file, not the zeros: ``fedkd.onnx_storage`` stores a mostly-zero
tensor as a bit mask plus its kept values (rows, columns or single entries), so the file
shrinks with the sparsity reported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["KINDS", "ItemRows", "PruneReport", "make_permanent", "prune_student", "pruned_items"]

KINDS = ("weights", "rows", "dims")


class ItemRows(prune.BasePruningMethod):
    """Zero the item-table rows (items 1..N) of smallest L2 norm; row 0 (padding) is left out
    of the count, so ``amount`` is a fraction of real items, exactly."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        drop = round(self.amount * (t.shape[0] - 1))
        mask = default_mask.clone()
        if drop:
            norms = t[1:].norm(dim=1)  # (N,)
            mask[torch.topk(norms, drop, largest=False).indices + 1] = 0
        return mask


@dataclass(frozen=True)
class PruneReport:
    """What pruning did; ``achieved`` is in the kind's own unit (weights, item rows, columns)."""

    kind: str
    requested: float
    achieved: float
    pruned: int  # weights, rows or columns removed
    total: int  # of how many
    tensors: dict[str, float] = field(default_factory=dict)  # name -> fraction of zeros

    def as_dict(self) -> dict:
        return {"kind": self.kind, "requested": self.requested, "achieved": self.achieved,
                "pruned": self.pruned, "total": self.total, "tensors": dict(self.tensors)}


def _weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Embedding and Linear layers: every matrix of the student (biases and LayerNorms, a few
    hundred scalars, are left alone)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.Linear))]


def prune_student(model: nn.Module, *, kind: str, sparsity: float) -> PruneReport:
    """Prune ``model`` in place (masks stay attached until :func:`make_permanent`).

    Parameters
    ----------
    model : a fedkd student (it needs ``item_emb``).
    kind : ``weights`` | ``rows`` | ``dims`` (see the module docstring).
    sparsity : fraction in ``[0, 1)`` to remove; 0 attaches nothing.
    """
    if kind not in KINDS:
        raise ValueError(f"prune kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if sparsity > 0:
        if kind == "weights":
            for _, module in _weight_modules(model):
                prune.l1_unstructured(module, "weight", amount=float(sparsity))
        elif kind == "rows":
            ItemRows.apply(model.item_emb, "weight", amount=float(sparsity))
            items = pruned_items(model)
            bias = torch.zeros(model.item_emb.num_embeddings)  # (N + 1,)
            bias[items] = torch.finfo(torch.float32).min / 2
            model.register_buffer("pruned_item_bias", bias)
            model.register_forward_hook(_floor_pruned_items)
        else:
            prune.ln_structured(model.item_emb, "weight", amount=float(sparsity), n=2, dim=1)
    return measure(model, kind=kind, requested=float(sparsity))


def _floor_pruned_items(module: nn.Module, args: tuple, scores: torch.Tensor) -> torch.Tensor:
    """Forward hook of a row-pruned student: pruned items score like the padding column."""
    return scores + module.pruned_item_bias.to(scores.dtype)  # (B, N + 1)


def _mask(module: nn.Module) -> torch.Tensor:
    mask = getattr(module, "weight_mask", None)
    return mask if mask is not None else (module.weight != 0).to(module.weight.dtype)


def pruned_items(model: nn.Module) -> torch.Tensor:
    """Ids (1..N) of the items whose whole row is zero in the item table's mask."""
    rows = _mask(model.item_emb)[1:].sum(1) == 0  # (N,)
    return torch.nonzero(rows).ravel() + 1


def measure(model: nn.Module, *, kind: str, requested: float = 0.0) -> PruneReport:
    """The sparsity ``model`` has now, in ``kind``'s unit (from the masks while attached)."""
    with torch.no_grad():
        tensors = {name: int((_mask(m) == 0).sum()) / _mask(m).numel() for name, m in _weight_modules(model)}
        if kind == "weights":
            counts = [(int((_mask(m) == 0).sum()), _mask(m).numel()) for _, m in _weight_modules(model)]
            pruned, total = sum(c for c, _ in counts), sum(n for _, n in counts)
        elif kind == "rows":
            pruned, total = len(pruned_items(model)), model.item_emb.num_embeddings - 1
        else:
            pruned, total = int((_mask(model.item_emb).sum(0) == 0).sum()), model.item_emb.embedding_dim
    return PruneReport(kind=kind, requested=requested, achieved=pruned / total, pruned=pruned, total=total,
                       tensors=tensors)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every attached mask into its weight (``prune.remove``): plain tensors with zeros,
    as an exporter wants them. The row floor hook of ``rows`` stays: it is part of the model."""
    for _, module in model.named_modules():
        if prune.is_pruned(module) and hasattr(module, "weight_orig"):
            prune.remove(module, "weight")
    return model
