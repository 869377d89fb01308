"""HeteroFL-style nested width tiers of one global student.

A device whose memory budget cannot hold the global student (width ``D = cfg.dim``) trains
a narrower student of width ``w`` instead: the *same architecture* (``ModelConfig`` with
only ``dim`` changed, built by :func:`fedkd.models.build_model`) whose every parameter is a
fixed sub-tensor of the global one (Diao et al., "HeteroFL", ICLR 2021). Narrow tiers are
nested (width 4 ⊂ width 8 ⊂ width 16), so the server can average updates of every tier
into the one global model (:func:`nested_mean`) and evaluate any tier on its own by
slicing the global state (:func:`slice_state`, :func:`build_sub_model`). A narrow model
maps histories to ``(B, N + 1)`` logits like any student, so the teacher's soft labels
(:func:`fedkd.distill.kd_loss`) apply to every tier unchanged.

The nesting has ONE definition, :func:`index_map`: per parameter, one index array per
axis; the sub-tensor is ``full[np.ix_(*idx)]``. Slicing reads through it, :func:`embed`
writes through it, and :func:`coverage` marks it, so the three cannot drift apart.

Which entries a width-``w`` tier keeps (``H = heads``, ``Dh = D / H``, ``wh = w / H``):

* every axis of size ``D`` that lives in the residual stream (the item and position
  embedding columns, LayerNorm weights and biases, the rows of ``attn.proj``, both FFN
  linears on both axes, the input columns of ``attn.qkv``; the MeanPool ``proj`` on both
  axes) keeps its first ``w`` entries;
* the output axis of ``attn.qkv`` (``3 * D`` entries, laid out ``(3, H, Dh)`` by
  :class:`fedkd.models.CausalSelfAttention`) keeps, for each of q, k, v and each head, the
  first ``wh`` entries of that head, and the input axis of ``attn.proj`` (laid out
  ``(H, Dh)``, head-major) keeps the first ``wh`` entries of each head; the kept indices
  are listed in the narrow model's own ``(3, H, wh)`` / ``(H, wh)`` order;
* axes of other sizes (the ``N + 1`` item rows, the ``max_len`` positions) are kept whole.

Why cut head-wise rather than keep the first ``w`` entries of q, k and v: the narrow
model keeps ``H`` heads (``ModelConfig(dim=w)`` changes nothing but ``dim``, so it is a
real model of the architecture, built and loaded strictly like any student) and reads
its q/k/v as ``(3, H, wh)``. A contiguous cut would hand its head 0 the first ``wh`` dims
of the wide head 0 *and* its head 1 the next ``wh`` dims of the wide head 0 (for
``w <= Dh``), i.e. narrow heads that are pieces of one wide head and attend with a softmax
the wide model never computed, while the wide heads ``1..H-1`` would get no training from
narrow tiers at all. The head-wise cut makes narrow head ``h`` a sub-head of wide head
``h`` (its attention logits are a partial sum of the wide head's ``q . k``), every wide
head is shared by every tier, and ``proj`` reads each sub-head from the columns that the
wide ``proj`` reads that head from. ``w % heads == 0`` is therefore required.

Embedding scale. :meth:`fedkd.models.SASRec.forward` multiplies item embeddings by
``sqrt(dim)``, so a width-``w`` model built from its own config scales the shared item
table by ``sqrt(w)`` while the global model scales the same entries by ``sqrt(D)``: in the
narrow model the items start ``sqrt(w / D)`` times weaker relative to the (unscaled)
position embeddings. Decision: every tier keeps its OWN scale ``sqrt(w)``. A narrow model
is then exactly ``build_model(replace(cfg, dim=w))``, with no special case on the device,
in the model code or on the wire, and the measurements below show that the global scale
``sqrt(D)`` buys nothing. (The global scale can even be had with the stock model, as a
reparametrisation: ``item_emb *= a``, ``ln_f.{weight,bias} /= a`` with ``a = sqrt(D / w)``
gives exactly the function of a width-``w`` SASRec with input scale ``sqrt(D)``, since the
tied table's extra ``a`` at the output is cancelled by ``ln_f``; but SGD in those
coordinates changes the item table's effective step by ``w / D`` and trained worse.)
Measured on a synthetic next-item task (N = 40 items, successor rule followed 80% of the
time, D = 16, 1 block, 1 head, full-ranking NDCG@10 on 160 users, 3 seeds):

* slicing a model trained at full width only (full NDCG 0.78-0.86): width 8 gives
  0.48-0.59 with the own scale vs 0.52-0.57 with the global one, width 4 gives 0.29-0.36 vs
  0.32-0.35 (a random width-4 model: 0.07-0.12). Sliced tiers are sane, clearly better
  than untrained, but slicing alone never makes a good narrow model; HeteroFL trains every
  tier;
* joint training (150 rounds; per round one client per tier, widths 4 / 8 / 16, 2 SGD
  steps on its slice of the global model, combined by :func:`nested_mean`): own scale
  w4 0.61 / 0.64 / 0.62, w8 0.85 / 0.77 / 0.85, w16 0.84 / 0.78 / 0.86; global scale
  (a subclass with a fixed ``sqrt(D)``) w4 0.62 / 0.64 / 0.69, w8 0.84 / 0.77 / 0.85, w16
  0.84 / 0.78 / 0.86; the stock-model reparametrisation of the global scale w4 0.55 / 0.52
  / 0.49. The two scales agree to within seed noise at every tier. Trained alone the same
  way, a width-16 model reaches 0.86 / 0.80 / 0.86 and a width-4 one 0.64 / 0.67 / 0.70:
  on this task sharing with the other tiers costs the wide tier nothing and the narrowest
  a little.

LayerNorm statistics over ``w`` instead of ``D`` features and attention's
``1 / sqrt(head_dim)`` (``1 / sqrt(wh)`` in a narrow tier) are the same kind of width
dependence; like HeteroFL we leave them to joint training.

Pure numpy/torch; no Flower. States are ``dict[name, float32 ndarray]`` as produced by
:func:`fedkd.local.get_state`; updates (state deltas) are handled the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedkd.aggregate import weighted_mean
from fedkd.models import ModelConfig, build_model

Index = tuple[np.ndarray, ...]  # one int64 index array per axis of a parameter


def check_width(full_cfg: ModelConfig, width: int) -> int:
    """``width`` as an int, or a ValueError naming what is wrong with it."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)):
        raise ValueError(f"width must be an int, got {width!r}")
    width = int(width)
    if not 1 <= width <= full_cfg.dim:
        raise ValueError(f"width must be in 1..{full_cfg.dim} (the global student's dim), got {width}")
    if full_cfg.kind == "sasrec" and width % full_cfg.heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({full_cfg.heads}): "
                         f"every tier keeps all heads, each cut to width / heads dims")
    return width


def sub_config(full_cfg: ModelConfig, width: int) -> ModelConfig:
    """The narrow tier's architecture: ``full_cfg`` with ``dim = width``, nothing else."""
    return dataclasses.replace(full_cfg, dim=check_width(full_cfg, width))


@functools.lru_cache(maxsize=64)
def _full_layout(full_cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Parameter names and shapes of ``build_model(full_cfg)``, from a weightless meta model."""
    with torch.device("meta"):
        model = build_model(full_cfg, seed=None)
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict().items())


def _headwise(heads: int, head_dim: int, keep: int, groups: int = 1) -> np.ndarray:
    """Indices into an axis laid out ``(groups, heads, head_dim)`` that keep the first ``keep``
    entries of every head, in the narrow ``(groups, heads, keep)`` order."""
    g, h, j = np.meshgrid(np.arange(groups), np.arange(heads), np.arange(keep), indexing="ij")
    return ((g * heads + h) * head_dim + j).ravel().astype(np.int64)


@functools.lru_cache(maxsize=64)
def _index_map(full_cfg: ModelConfig, width: int) -> dict[str, Index]:
    D, w = full_cfg.dim, width
    res = np.arange(w, dtype=np.int64)  # residual-stream axis: the first w dims
    if full_cfg.kind == "sasrec":
        H = full_cfg.heads
        qkv = _headwise(H, D // H, w // H, groups=3)  # (3 * w,) q, k, v of each head
        heads_in = _headwise(H, D // H, w // H)  # (w,) proj input, head-major
    out: dict[str, Index] = {}
    for name, shape in _full_layout(full_cfg):
        parts = name.split(".")
        leaf, module = parts[-1], parts[-2] if len(parts) > 1 else ""
        if name in ("item_emb.weight", "pos_emb.weight"):
            axes = (np.arange(shape[0], dtype=np.int64), res)
        elif full_cfg.kind == "sasrec" and module == "qkv":
            axes = (qkv, res) if leaf == "weight" else (qkv,)
        elif full_cfg.kind == "sasrec" and module == "proj":  # attn.proj: (D out, D in head-major)
            axes = (res, heads_in) if leaf == "weight" else (res,)
        elif all(n == D for n in shape) and len(shape) in (1, 2):  # LayerNorms, FFN, MeanPool proj
            axes = (res,) * len(shape)
        else:
            raise ValueError(f"no nesting rule for parameter {name!r} of shape {shape} ({full_cfg.kind})")
        for a in axes:
            a.setflags(write=False)  # cached and shared: nobody may edit the one definition
        out[name] = axes
    return out


def index_map(full_cfg: ModelConfig, width: int) -> dict[str, Index]:
    """THE nesting: per parameter of ``build_model(full_cfg)``, one read-only int64 index
    array per axis, listing (in the narrow model's own order) which entries of the full
    axis the width-``width`` tier holds. ``full[np.ix_(*idx)]`` is the narrow tensor.

    Each index array is increasing, so the covered entries of a narrower tier are a subset
    of a wider tier's (nesting) and distinct entries map to distinct entries (a slice is
    invertible on what it covers)."""
    return dict(_index_map(full_cfg, check_width(full_cfg, width)))  # cached: hand out a copy


def coverage(full_cfg: ModelConfig, width: int) -> dict[str, np.ndarray]:
    """Per parameter, a boolean mask of the full shape: True where the tier holds the entry."""
    masks = {}
    for (name, shape), idx in zip(_full_layout(full_cfg), index_map(full_cfg, width).values()):
        m = np.zeros(shape, dtype=bool)
        m[np.ix_(*idx)] = True
        masks[name] = m
    return masks


def sub_layout(full_cfg: ModelConfig, width: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the narrow tier's parameters (equal to ``codec.layout_of`` of its state)."""
    return {name: tuple(len(a) for a in idx) for name, idx in index_map(full_cfg, width).items()}


def _check_keys(state: Mapping[str, np.ndarray], names: Sequence[str], what: str) -> None:
    if set(state) != set(names):
        missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        raise ValueError(f"{what} does not match the model: missing {missing}, unexpected {extra}")


def slice_state(full_state: Mapping[str, np.ndarray], full_cfg: ModelConfig, width: int) -> dict[str, np.ndarray]:
    """The state of ``sub_config(full_cfg, width)`` held inside ``full_state`` (fresh
    float32 copies). Works for states and for updates alike; ``width == dim`` is the identity."""
    idx = index_map(full_cfg, width)
    _check_keys(full_state, list(idx), "full state")
    out = {}
    for (name, shape), axes in zip(_full_layout(full_cfg), idx.values()):
        arr = np.asarray(full_state[name])
        if arr.shape != shape:
            raise ValueError(f"{name}: expected full shape {shape}, got {arr.shape}")
        out[name] = np.ascontiguousarray(arr[np.ix_(*axes)], dtype=np.float32)
    return out


def embed(sub_state: Mapping[str, np.ndarray], full_cfg: ModelConfig,
          width: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Place a width-``width`` state or update into zeros of the full shapes.

    Returns ``(arrays, masks)``: float32 arrays of the full shapes holding ``sub_state``
    at the tier's entries and 0 elsewhere, and the tier's :func:`coverage` masks.
    ``slice_state(embed(x)[0], full_cfg, width) == x`` exactly."""
    idx = index_map(full_cfg, width)
    _check_keys(sub_state, list(idx), "sub-state")
    arrays, masks = {}, coverage(full_cfg, width)
    for (name, shape), axes in zip(_full_layout(full_cfg), idx.values()):
        sub = np.asarray(sub_state[name])
        want = tuple(len(a) for a in axes)
        if sub.shape != want:
            raise ValueError(f"{name}: width-{width} tier expects shape {want}, got {sub.shape}")
        full = np.zeros(shape, dtype=np.float32)
        full[np.ix_(*axes)] = sub
        arrays[name] = full
    return arrays, masks


def nested_mean(updates: Sequence[tuple[int, Mapping[str, np.ndarray]]], weights: Sequence[float],
                full_cfg: ModelConfig, *, reduce=None) -> dict[str, np.ndarray]:
    """HeteroFL aggregation of updates from mixed tiers into one full-shape update.

    ``updates`` holds ``(width, update)`` pairs, each update shaped like its tier's state.
    Every entry of the result is the ``weights``-weighted mean of the updates of the
    clients whose tier covers that entry; an entry no client covers gets 0 (so
    :func:`fedkd.aggregate.apply_update` leaves it unchanged), and so does an entry whose
    covering clients all have weight 0.

    Because the tiers are nested, the clients covering an entry are exactly those at least
    as wide as the narrowest tier holding it; each such "ring" of entries is averaged with
    :func:`fedkd.aggregate.weighted_mean` (float64 accumulation) over its clients. With every
    client at full width the result is therefore bit-identical to ``weighted_mean``.

    Order: like ``weighted_mean``, the result does not depend on the clients' order beyond
    float64 rounding, which survives the float32 cast in a few entries by one float32 ulp
    (measured: 51 of 235,200 entries over 20 shuffles of 40 clients). For bit-identical
    runs pass the clients in a canonical order (the server sorts replies by partition id).

    ``reduce(updates, weights)`` combines one ring (default
    :func:`fedkd.aggregate.weighted_mean`; :func:`fedkd.aggregate.trimmed_mean` for robust
    aggregation), so every combination rule handles mixed widths the same way.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),):
        raise ValueError(f"got {len(updates)} updates but {w.size} weights")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be finite, >= 0 with a positive sum, got {w.tolist()}")
    widths = np.array([check_width(full_cfg, width) for width, _ in updates])
    embedded = [embed(u, full_cfg, width)[0] for width, u in updates]
    out = {name: np.zeros(shape, dtype=np.float32) for name, shape in _full_layout(full_cfg)}
    inner = None  # coverage of the next narrower tier (nothing inside the narrowest)
    for t in np.unique(widths):  # ascending
        ring_clients = np.flatnonzero(widths >= t)
        cov = coverage(full_cfg, int(t))
        if w[ring_clients].sum() > 0:
            mean = (reduce or weighted_mean)([embedded[i] for i in ring_clients], w[ring_clients])
            for name in out:
                ring = cov[name] if inner is None else cov[name] & ~inner[name]
                out[name][ring] = mean[name][ring]
        inner = cov
    return out


def build_sub_model(full_cfg: ModelConfig, width: int, *, full_state: Mapping[str, np.ndarray] | None = None,
                    seed: int = 0) -> nn.Module:
    """A width-``width`` student: ``build_model(sub_config(full_cfg, width), seed=seed)``,
    loaded strictly with ``slice_state(full_state, ...)`` when ``full_state`` is given
    (e.g. the global student, to train or evaluate that tier). Returned in eval mode when
    loaded, like :func:`fedkd.local.local_train` leaves a model. The init always draws from
    ``seed`` in a forked RNG, so loading a tier never advances the caller's global RNG."""
    cfg = sub_config(full_cfg, width)
    model = build_model(cfg, seed=seed)
    if full_state is not None:
        sub = slice_state(full_state, full_cfg, width)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sub.items()}, strict=True)
        model.eval()
    return model
