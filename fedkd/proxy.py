"""The public proxy set and the teacher's soft labels on it.

The proxy set is drawn from cloud users' training prefixes (data the cloud may hold and
publish). Each round one batch of it, with the teacher's top-k soft labels, goes to
every selected client; the labels are computed once per batch and reused for all
clients of the round.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkd import streams
from fedkd.codec import PayloadError, pack_ids, unpack_ids
from fedkd.distill import SoftLabels, decode_soft_labels, encode_soft_labels, teacher_soft_labels
from fedkd.local import ProxyBatch
from fedkd.samples import train_samples
from fedkd.streams import Stream


def build_proxy_set(sequences, cloud_users: np.ndarray, *, size: int, max_len: int,
                    seed: int) -> np.ndarray:
    """(P, L) histories: a seeded sample of every-prefix histories of cloud users."""
    train_seqs = [sequences[u][:-2] for u in cloud_users]
    hist, _ = train_samples(train_seqs, max_len)
    if len(hist) == 0:
        raise ValueError("no cloud-user training prefixes: the proxy set would be empty "
                         "(raise cloud-fraction or set kd-weight = 0)")
    take = streams.rng(seed, Stream.PROXY_SET).choice(len(hist), size=min(size, len(hist)), replace=False)
    return hist[np.sort(take)]


def round_batch(proxy: np.ndarray, *, round_idx: int, size: int, seed: int) -> np.ndarray:
    return proxy[round_rows(len(proxy), round_idx=round_idx, size=size, seed=seed)]


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


# --- the naive baseline: full float32 distributions ------------------------------------------
@torch.no_grad()
def full_distribution(teacher: torch.nn.Module, histories: np.ndarray, *, temperature: float,
                      batch_size: int = 512) -> np.ndarray:
    """(P, N) float32 tempered teacher distribution over every real item, in item order: what
    plain federated distillation would send. The baseline soft-label compression is measured by."""
    teacher.eval()
    out = [torch.softmax(teacher(torch.from_numpy(histories[s:s + batch_size]))[:, 1:].to(torch.float64)
                         / temperature, dim=1).numpy().astype(np.float32)
           for s in range(0, len(histories), batch_size)]
    return np.concatenate(out)


def encode_full_proxy(histories: np.ndarray, probs: np.ndarray, *, num_items: int) -> dict[str, np.ndarray]:
    return {"histories": pack_ids(histories, num_items), "sl.probs": np.ascontiguousarray(probs, np.float32)}


def decode_full_proxy(arrays: dict[str, np.ndarray], *, rows: int, max_len: int, num_items: int) -> ProxyBatch:
    """Inverse of :func:`encode_full_proxy`: every item is a label (k = N, no rest bin)."""
    if set(arrays) != {"histories", "sl.probs"}:
        raise PayloadError("missing-key", f"full soft labels need arrays histories and sl.probs, got {sorted(arrays)}")
    probs = arrays["sl.probs"]
    if probs.dtype != np.float32 or probs.shape != (rows, num_items):
        raise PayloadError("dtype" if probs.dtype != np.float32 else "shape", f"'sl.probs' has dtype {probs.dtype} and shape {probs.shape}, expected float32 "
                           f"{(rows, num_items)}")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1 + 1e-5:
        raise PayloadError("malformed", "'sl.probs' must be finite and in [0, 1]")
    ids = np.broadcast_to(np.arange(1, num_items + 1, dtype=np.int64), (rows, num_items)).copy()
    return ProxyBatch(histories=unpack_ids(arrays["histories"], (rows, max_len), num_items), ids=ids,
                      probs=probs.copy())


# --- caching on the device, deltas on the wire ------------------------------------------------
def round_rows(proxy_len: int, *, round_idx: int, size: int, seed: int) -> np.ndarray:
    """Proxy-set rows of a round's batch (the same draw as :func:`round_batch`)."""
    rng = streams.rng(seed, Stream.PROXY_BATCH, round_idx)
    return rng.choice(proxy_len, size=min(size, proxy_len), replace=False)


def label_digests(sl: SoftLabels, *, num_items: int, bits: int) -> list[bytes]:
    """Per row, a digest of the labels as a device would decode them: equal digests mean a
    device holding the row has nothing to update (rows are quantised independently)."""
    import hashlib

    rows = len(sl.ids)
    dec = decode_labels(encode_labels(sl, num_items=num_items, bits=bits), rows=rows, top_k=sl.ids.shape[1],
                        num_items=num_items, bits=bits)
    return [hashlib.sha256(dec.ids[i].tobytes() + dec.probs[i].tobytes()).digest()[:16] for i in range(rows)]


class CacheMirror:
    """The server's record of what each device holds: per partition, proxy row -> label digest.

    It only ever under-states a device's cache: rows are recorded once the device has replied
    to the message that carried them (a device stores them before it trains), and a device
    that failed or did not reply is forgotten, so it gets full rows again next time."""

    def __init__(self) -> None:
        self.held: dict[int, dict[int, bytes]] = {}

    def delta(self, pid: int, rows: np.ndarray, digests: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(rows whose history the device lacks, rows whose labels it lacks or holds stale), as masks."""
        held = self.held.get(pid, {})
        need_hist = np.array([int(r) not in held for r in rows], bool)
        need_label = np.array([held.get(int(r)) != d for r, d in zip(rows, digests)], bool)
        return need_hist, need_label

    def commit(self, pid: int, rows: np.ndarray, digests: list[bytes]) -> None:
        self.held.setdefault(pid, {}).update({int(r): d for r, d in zip(rows, digests)})

    def forget(self, pid: int) -> None:
        self.held.pop(pid, None)


def encode_cached_proxy(rows: np.ndarray, histories: np.ndarray, sl: SoftLabels, need_hist: np.ndarray,
                        need_label: np.ndarray, *, proxy_len: int, num_items: int,
                        bits: int) -> dict[str, np.ndarray]:
    """A batch as row numbers plus only the histories and labels the device lacks.

    ``rows`` are bit-packed at ``bit_length(proxy_len - 1)`` bits, the two masks at one bit a
    row; histories and labels of the masked rows follow in :func:`encode_proxy`'s format."""
    out = {"rows": pack_ids(rows, proxy_len - 1), "hist-mask": np.packbits(need_hist),
           "label-mask": np.packbits(need_label)}
    if need_hist.any():
        out["histories"] = pack_ids(histories[need_hist], num_items)
    if need_label.any():
        sub = SoftLabels(ids=sl.ids[need_label], probs=sl.probs[need_label])
        out.update({f"sl.{k}": v for k, v in encode_labels(sub, num_items=num_items, bits=bits).items()})
    return out


def decode_cached_proxy(arrays: dict[str, np.ndarray], cache: dict[str, np.ndarray] | None, *, rows: int,
                        proxy_len: int, top_k: int, max_len: int, num_items: int,
                        bits: int) -> tuple[ProxyBatch, dict[str, np.ndarray]]:
    """Fill a delta batch from the device's cache; return the batch and the updated cache.

    Raises ValueError naming the rows when the message relies on rows the cache does not
    hold (a device whose storage was wiped): the server then forgets it and resends in full.
    """
    for key in ("rows", "hist-mask", "label-mask"):
        if key not in arrays:
            raise PayloadError("missing-key", f"cached proxy batch lacks '{key}'")
    idx = unpack_ids(arrays["rows"], (rows,), proxy_len - 1)
    masks = []
    for key in ("hist-mask", "label-mask"):
        m = arrays[key]
        if m.dtype != np.uint8 or m.shape != (-(-rows // 8),):
            raise PayloadError("dtype" if m.dtype != np.uint8 else "shape", f"'{key}' has dtype {m.dtype} and shape {m.shape}, expected uint8 ({-(-rows // 8)},)")
        masks.append(np.unpackbits(m)[:rows].astype(bool))
    need_hist, need_label = masks
    cached = {int(r): i for i, r in enumerate(cache["rows"])} if cache else {}
    missing = [int(r) for r, h, lab in zip(idx, need_hist, need_label) if (not h or not lab) and int(r) not in cached]
    if missing:
        raise ValueError(f"the server assumed proxy rows {missing[:10]} are cached on this device, but they "
                         "are not (storage lost?)")
    hist = np.zeros((rows, max_len), np.int64)
    ids = np.zeros((rows, top_k), np.int64)
    probs = np.zeros((rows, top_k), np.float32)
    for i, r in enumerate(idx):
        if int(r) in cached:
            j = cached[int(r)]
            hist[i], ids[i], probs[i] = cache["histories"][j], cache["ids"][j], cache["probs"][j]
    if need_hist.any():
        hist[need_hist] = unpack_ids(arrays.get("histories", np.zeros(0, np.uint8)),
                                     (int(need_hist.sum()), max_len), num_items)
    if need_label.any():
        sl = decode_labels({k[3:]: v for k, v in arrays.items() if k.startswith("sl.")},
                           rows=int(need_label.sum()), top_k=top_k, num_items=num_items, bits=bits)
        ids[need_label], probs[need_label] = sl.ids, sl.probs
    # the cache: every row held before, with this batch's rows overwritten
    merged = dict(cached)
    all_rows = list(cache["rows"]) if cache else []
    store = {k: list(cache[k]) for k in ("histories", "ids", "probs")} if cache else {"histories": [], "ids": [],
                                                                                       "probs": []}
    for i, r in enumerate(idx):
        r = int(r)
        if r in merged:
            j = merged[r]
        else:
            j = merged[r] = len(all_rows)
            all_rows.append(r)
            for k in store:
                store[k].append(None)
        store["histories"][j], store["ids"][j], store["probs"][j] = hist[i], ids[i], probs[i]
    new_cache = {"rows": np.asarray(all_rows, np.int64),
                 "histories": np.asarray(store["histories"], np.int32).reshape(-1, max_len),
                 "ids": np.asarray(store["ids"], np.int32).reshape(-1, top_k),
                 "probs": np.asarray(store["probs"], np.float32).reshape(-1, top_k)}
    return ProxyBatch(histories=hist, ids=ids, probs=probs), new_cache
