"""Secure aggregation by pairwise masks: the server learns the sum of the updates, not one of them.

Why not Flower's SecAgg+: in flwr 1.41 it exists only as ``SecAggPlusWorkflow``, a workflow of
the legacy API that needs a ``LegacyContext`` with a legacy ``Strategy`` and runs its own four
train-message stages, plus the client mod ``secaggplus_mod`` that expects replies in the legacy
``fitres.*`` record layout; fedkd's rounds drive the Message-API Grid directly with quantised,
sliced payloads. docs/privacy.md gives the file references.

The construction (Bonawitz et al., CCS 2017, the masking core without its secret sharing):

1. every participant ``i`` of a round makes an X25519 key pair and publishes the public key;
2. for each other participant ``j``, both derive the same 32-byte seed from their X25519 shared
   secret with HKDF-SHA256 (bound to the round and the two ids), and expand it into a mask
   vector over ``Z_(2^32)`` with the ChaCha20 stream cipher;
3. ``i`` encodes its (clipped) update in fixed point (``frac_bits`` fractional bits, two's
   complement mod 2^32), adds the masks it shares with every ``j > i`` and subtracts those
   with ``j < i``, and sends only that;
4. the server adds all masked vectors mod 2^32: every mask appears once with + and once with
   -, so the sum is exactly the sum of the fixed-point updates, which it decodes.

Each masked vector alone is the update plus a sum of pseudo-random vectors the server cannot
compute without a private key, i.e. uniformly distributed. Dropouts: a participant that
publishes its key and then sends nothing leaves its pairwise masks in the others' vectors, and
the sum is garbage; without the Shamir-shared seeds of SecAgg/SecAgg+ the server cannot remove
them. :func:`unmask_sum` therefore refuses a sum over a set that differs from the key set.
Noise for central DP can only be added to the sum by the server (or in shares by the
clients), and the server cannot clip what it cannot see, so clients must clip first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MOD_BITS = 32


# ----------------------------------------------------------------------------- fixed point
def max_abs_sum(frac_bits: int) -> float:
    """Largest |sum| that fits the signed range of Z_(2^32) at ``frac_bits`` fractional bits."""
    return (2 ** (MOD_BITS - 1) - 1) / 2 ** frac_bits


def encode(x: np.ndarray, frac_bits: int) -> np.ndarray:
    """round(x * 2^f) as two's complement in Z_(2^32) (uint32)."""
    q = np.rint(np.asarray(x, np.float64) * 2.0 ** frac_bits)
    if np.abs(q).max(initial=0) > 2 ** (MOD_BITS - 1) - 1:
        raise ValueError(f"value out of the fixed-point range +-{max_abs_sum(frac_bits):g}")
    return q.astype(np.int64).astype(np.uint32)


def decode(s: np.ndarray, frac_bits: int) -> np.ndarray:
    """Inverse of :func:`encode` for a (summed) uint32 vector."""
    return np.asarray(s, np.uint32).view(np.int32).astype(np.float64) / 2.0 ** frac_bits


# ----------------------------------------------------------------------------- keys and masks
@dataclass
class KeyPair:
    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))


def pair_seed(mine: KeyPair, peer_public: bytes, my_id: int, peer_id: int, round_idx: int) -> bytes:
    """The seed ``i`` and ``j`` share: HKDF-SHA256 of their X25519 secret, bound to the round and
    the (unordered) pair, so a seed is never reused across rounds or pairs."""
    shared = mine.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    a, b = sorted((int(my_id), int(peer_id)))
    info = f"fedkd-secagg|round={round_idx}|pair={a},{b}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint32 words: the ChaCha20 keystream of ``seed`` (zero nonce; each
    seed is used once)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (4 * n)), dtype="<u4").astype(np.uint32)


def mask(encoded: np.ndarray, mine: KeyPair, my_id: int, peers: Mapping[int, bytes], round_idx: int) -> np.ndarray:
    """``encoded + sum_{j > i} m_ij - sum_{j < i} m_ij`` mod 2^32; ``peers`` maps every other
    participant's id to its public key."""
    out = np.array(encoded, dtype=np.uint32, copy=True)
    for j, pub in sorted(peers.items()):
        if j == my_id:
            continue
        m = prg(pair_seed(mine, pub, my_id, j, round_idx), out.size)
        out = out + m if j > my_id else out - m  # uint32 arithmetic wraps: exactly mod 2^32
    return out


def unmask_sum(masked: Mapping[int, np.ndarray], key_set: Sequence[int]) -> np.ndarray:
    """Sum of the masked vectors mod 2^32 = sum of the encoded updates, if and only if every
    participant that published a key sent its vector; otherwise refuse (no dropout recovery)."""
    missing = sorted(set(key_set) - set(masked))
    if missing:
        raise ValueError(f"secure aggregation: participants {missing} published keys but sent no masked "
                         "update; their pairwise masks cannot be removed without secret sharing (SecAgg+)")
    extra = sorted(set(masked) - set(key_set))
    if extra:
        raise ValueError(f"secure aggregation: updates from {extra}, who published no key")
    total = np.zeros_like(next(iter(masked.values())), dtype=np.uint32)
    for v in masked.values():
        total = total + np.asarray(v, np.uint32)
    return total


def secure_sum(updates: Mapping[int, np.ndarray], round_idx: int, *, frac_bits: int = 16) -> np.ndarray:
    """The whole protocol in one process, for tests and for reading: keys, masks, sum, decode."""
    keys = {i: KeyPair.generate() for i in updates}
    pubs = {i: k.public_bytes for i, k in keys.items()}
    masked = {i: mask(encode(u, frac_bits), keys[i], i, pubs, round_idx) for i, u in updates.items()}
    return decode(unmask_sum(masked, list(keys)), frac_bits)


# ----------------------------------------------------------------------------- fedkd's rounds
FRAC_BITS = 16  # resolution 1.5e-5; sums up to +-32767 (150 clients x |value| <= 218)


def flatten(state: Mapping[str, np.ndarray], layout: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """One float64 vector in ``layout`` order (both ends use the full student's layout)."""
    return np.concatenate([np.asarray(state[k], np.float64).reshape(-1) for k in layout]) if layout else np.zeros(0)


def unflatten(vec: np.ndarray, layout: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for k, shape in layout.items():
        n = int(np.prod(shape, dtype=np.int64))
        out[k] = vec[start:start + n].reshape(shape)
        start += n
    if start != vec.size:
        raise ValueError(f"vector of {vec.size} values for a layout of {start}")
    return out


def masked_upload(update_full: Mapping[str, np.ndarray], layout: Mapping[str, tuple[int, ...]], mine: KeyPair,
                  my_id: int, peer_ids: Sequence[int], peer_keys: np.ndarray, round_idx: int) -> np.ndarray:
    """What a device sends: its full-width update in fixed point under its pairwise masks.
    ``peer_ids`` / ``peer_keys`` (m, 32) list every participant of the round, itself included."""
    ids = [int(i) for i in peer_ids]
    if my_id not in ids:
        raise ValueError(f"device {my_id} is not among this round's key holders {ids}")
    if ids != sorted(set(ids)) or peer_keys.shape != (len(ids), 32) or peer_keys.dtype != np.uint8:
        raise ValueError("malformed peer list: expected sorted unique ids and a (m, 32) uint8 key array")
    if bytes(peer_keys[ids.index(my_id)]) != mine.public_bytes:
        raise ValueError("the server listed a public key for this device that is not its own")
    peers = {i: bytes(k) for i, k in zip(ids, peer_keys)}
    return mask(encode(flatten(update_full, layout), FRAC_BITS), mine, my_id, peers, round_idx)
