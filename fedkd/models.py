"""Next-item recommenders: a small SASRec (teacher and student) and a mean-pool student.

Both map a left-padded history ``(B, L)`` (0 = padding, most recent item last) to logits
over every item ``(B, N + 1)`` at the last position, so training, distillation and full
ranking treat them alike. Parameter names are the keys on the wire of federated
training: rename nothing without bumping the protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("sasrec", "meanpool")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture only; the model never sees training settings (lr, epochs, seeds)."""

    kind: str = "sasrec"  # "sasrec" | "meanpool"
    num_items: int = 0  # N; item ids are 1..N, 0 is padding
    dim: int = 16
    blocks: int = 1  # sasrec only
    heads: int = 1  # sasrec only
    max_len: int = 50
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("num_items", "dim", "blocks", "heads", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.kind == "sasrec" and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _tied_scores(h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``h @ E^T`` with item 0 pushed to a huge but finite score, fused into one addmm:
    never ranked, ignored by softmax, yet no ``inf - inf`` NaN inside a loss. The offset
    swamps any ``h . E[0]``, so it holds even if averaging moves the padding row off zero."""
    pad = torch.zeros(items.shape[0], dtype=h.dtype, device=h.device)  # (N + 1,)
    pad[0] = torch.finfo(h.dtype).min / 2
    return torch.addmm(pad, h, items.T)  # (B, N + 1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention under an additive mask. The attention weights themselves are not
    dropped: a Bernoulli draw over (B, H, L, L) is the costliest op of a CPU step."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))


class Block(nn.Module):
    """Pre-LN transformer block: trains stably at the tiny widths edge students use."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.ffn(self.ln2(x))


class SASRec(nn.Module):
    """Self-attentive sequential recommender (Kang & McAuley, 2018), pre-LN variant.

    The output layer is the item embedding itself (``scores = h @ E^T``): the item table
    dominates the parameter count, so tying halves what an edge device stores and sends.
    Positions count back from the most recent item, so extra left padding is a no-op.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln_f = nn.LayerNorm(cfg.dim)
        _init_embeddings(self.item_emb, self.pos_emb)

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` item ids, left-padded -> ``(B, N + 1)`` logits; only the last
        ``max_len`` items are used (the model has no positions beyond them)."""
        hist = hist[:, -self.cfg.max_len:]
        B, L = hist.shape
        keep = (hist > 0).unsqueeze(-1)  # (B, L, 1)
        # (L - 1) - arange, not arange(L - 1, -1, -1): onnxruntime's GatherToSliceFusion turns a
        # Range with a negative step feeding a Gather into an empty Slice (end -1 = last item),
        # which breaks exported students (fedkd/export.py) at the default optimisation level.
        recency = (L - 1) - torch.arange(L, device=hist.device)  # (L,) 0 = most recent
        x = self.item_emb(hist) * math.sqrt(self.cfg.dim) + self.pos_emb(recency)  # (B, L, D)
        x = self.drop(x) * keep  # padded slots carry nothing
        causal = torch.ones(L, L, dtype=torch.bool, device=hist.device).tril()  # (L, L)
        allowed = (causal & keep.transpose(1, 2)).unsqueeze(1)  # (B, 1, L, L): query i sees real keys j <= i
        # An additive finite mask (not -inf, not bool) keeps rows whose keys are all padding
        # uniform instead of NaN; those rows are padding queries that nothing downstream reads.
        mask = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask) * keep  # re-zero padded queries so they stay inert
        h = self.ln_f(x[:, -1])  # (B, D)
        return _tied_scores(h, self.item_emb.weight)  # (B, N + 1)


class MeanPool(nn.Module):
    """Order-blind baseline student: mean of the history's item embeddings, one linear map,
    tied output. The smallest model that still personalises, for the weakest devices."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        _init_embeddings(self.item_emb)

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        """Same contract as :meth:`SASRec.forward`; an all-padding history pools to zero."""
        hist = hist[:, -self.cfg.max_len:]
        keep = (hist > 0).unsqueeze(-1).to(self.item_emb.weight.dtype)  # (B, L, 1)
        pooled = (self.item_emb(hist) * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (B, D)
        h = self.proj(self.drop(pooled))  # (B, D)
        return _tied_scores(h, self.item_emb.weight)  # (B, N + 1)


def _init_embeddings(*embs: nn.Embedding) -> None:
    """Small embeddings (std 1/sqrt(D)) keep the tied logits O(1) at start; row 0 stays zero."""
    for emb in embs:
        nn.init.normal_(emb.weight, std=emb.embedding_dim ** -0.5)
        if emb.padding_idx is not None:
            with torch.no_grad():
                emb.weight[emb.padding_idx].zero_()


def build_model(cfg: ModelConfig, *, seed: int | None = 0) -> nn.Module:
    """Build ``cfg.kind``; the init draws from ``seed`` without touching the global RNG,
    so every client and the server can rebuild bit-identical weights. ``None`` skips the
    seeding (global RNG) for models whose weights are about to be overwritten anyway."""
    cls = {"sasrec": SASRec, "meanpool": MeanPool}[cfg.kind]
    if seed is None:
        return cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def num_parameters(model: nn.Module) -> int:
    """Trainable scalars: what a device stores and, at 32 bits, what one round sends."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
