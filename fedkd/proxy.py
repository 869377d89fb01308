"""The public proxy set and the teacher's soft labels on it.

The proxy set is drawn from cloud users' training prefixes (data the cloud may hold and
publish). Each round one batch of it, with the teacher's top-k soft labels, goes to
every selected client; the labels are computed once per batch and reused for all
clients of the round.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkd.codec import PayloadError, pack_ids, unpack_ids
from fedkd.distill import SoftLabels, decode_soft_labels, encode_soft_labels, teacher_soft_labels
from fedkd.local import ProxyBatch
from fedkd.samples import train_samples


def build_proxy_set(sequences, cloud_users: np.ndarray, *, size: int, max_len: int,
                    seed: int) -> np.ndarray:
    """(P, L) histories: a seeded sample of every-prefix histories of cloud users."""
    train_seqs = [sequences[u][:-2] for u in cloud_users]
    hist, _ = train_samples(train_seqs, max_len)
    if len(hist) == 0:
        raise ValueError("no cloud-user training prefixes: the proxy set would be empty "
                         "(raise cloud-fraction or set kd-weight = 0)")
    take = np.random.default_rng([seed, 4]).choice(len(hist), size=min(size, len(hist)), replace=False)
    return hist[np.sort(take)]


def round_batch(proxy: np.ndarray, *, round_idx: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 5, round_idx])
    return proxy[rng.choice(len(proxy), size=min(size, len(proxy)), replace=False)]


@torch.no_grad()
def soft_labels(teacher: torch.nn.Module, histories: np.ndarray, *, temperature: float,
                top_k: int, batch_size: int = 512) -> SoftLabels:
    teacher.eval()
    ids, probs = [], []
    for s in range(0, len(histories), batch_size):
        sl = teacher_soft_labels(teacher(torch.from_numpy(histories[s:s + batch_size])),
                                 temperature=temperature, top_k=top_k)
        ids.append(sl.ids)
        probs.append(sl.probs)
    return SoftLabels(ids=np.concatenate(ids), probs=np.concatenate(probs))


def encode_labels(sl: SoftLabels, *, num_items: int, bits: int) -> dict[str, np.ndarray]:
    """Bit-packed ids and quantised probabilities of top-k labels. Their shape and bit width
    follow from the config both ends share plus a row count sent alongside, so they do not travel."""
    enc = encode_soft_labels(sl, bits=bits, num_items=num_items)
    return {"ids": pack_ids(enc["ids"], num_items),
            **{k: v for k, v in enc.items() if k not in ("ids", "probs.shape", "probs.bits")}}


def decode_labels(arrays: dict[str, np.ndarray], *, rows: int, top_k: int, num_items: int,
                  bits: int) -> SoftLabels:
    """Inverse of :func:`encode_labels`; raises ValueError (or PayloadError) on a mismatch."""
    shape = (rows, top_k)
    if "ids" not in arrays:
        raise PayloadError("missing-key", "labels lack their 'ids' array")
    return decode_soft_labels({**arrays, "ids": unpack_ids(arrays["ids"], shape, num_items).astype(np.uint32),
                               "probs.shape": np.array(shape, np.int64), "probs.bits": np.array(bits, np.int64)})


def encode_proxy(histories: np.ndarray, sl: SoftLabels, *, num_items: int, bits: int) -> dict[str, np.ndarray]:
    """What a train message carries for distillation: bit-packed histories plus their labels."""
    return {"histories": pack_ids(histories, num_items),
            **{f"sl.{k}": v for k, v in encode_labels(sl, num_items=num_items, bits=bits).items()}}


def decode_proxy(arrays: dict[str, np.ndarray], *, rows: int, top_k: int, max_len: int,
                 num_items: int, bits: int) -> ProxyBatch:
    """Inverse of :func:`encode_proxy`; raises ValueError (or PayloadError) on a mismatch."""
    sl = decode_labels({k[len("sl."):]: v for k, v in arrays.items() if k.startswith("sl.")},
                       rows=rows, top_k=top_k, num_items=num_items, bits=bits)
    return ProxyBatch(histories=unpack_ids(arrays["histories"], (rows, max_len), num_items),
                      ids=sl.ids, probs=sl.probs)
