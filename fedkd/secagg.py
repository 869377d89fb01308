"""Secure aggregation with dropout recovery (SecAgg, Bonawitz et al. CCS 2017; SecAgg+, Bell et al.
CCS 2020): the server learns the sum of the surviving devices' quantised updates, not one of them.

The protocol of one round, among the ``n`` devices the server picked (ids sorted, Shamir
x-coordinate of a device = its 1-based position in that list):

0. once per run, at the handshake, every device publishes a long-term X25519 *encryption* key
   ``c_pk`` (never revealed: it only protects the shares in transit);
1. **share** (``query.secagg_keys``): the server sends the ids and ``c_pk`` of the round's
   devices and the threshold ``t``. Device ``i`` draws two fresh 16-byte seeds: ``b_i`` (its
   self mask) and ``s_i`` (from which its *mask key pair* ``s_sk, s_pk`` is derived), splits
   each into ``n`` Shamir shares with threshold ``t`` (over the prime field of ``2^127 - 1``,
   :func:`split`), keeps its own pair of
   shares, encrypts the pair for every other device ``j`` with AES-GCM under a key only ``i``
   and ``j`` can derive (X25519 of the ``c`` keys, HKDF bound to the round, the direction and
   ``i``'s fresh ``s_pk``), and replies ``s_pk || ciphertexts`` (the server cannot read them);
2. **mask** (``train``): the devices that answered step 1 (``U1``) receive each other's
   ``s_pk``. Device ``i`` quantises its update on the grid the server fixed (per-tensor ranges,
   :func:`quantize`), giving integer codes in ``[0, 2^b - 2]``, and sends
   ``codes + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)`` in the ring
   ``Z_(2^k)``, ``k = ring_bits(|U1|, b)``: the configured bit width plus the headroom the sum
   of ``|U1|`` codes needs, bit-packed at ``k`` bits per value;
3. **unmask** (``query.secagg_unmask``): the server names the devices whose masked vector it
   accepted (``U2``) and hands each survivor the ciphertexts addressed to it. For every peer
   a survivor reveals exactly one share: of ``b_j`` if ``j`` is in ``U2``, of ``s_j`` if ``j``
   dropped. With ``t`` answers the server rebuilds each survivor's ``b`` (removes the self
   masks) and each dropped device's ``s`` (recomputes and removes the pairwise masks it left in
   the survivors' vectors); the result is the exact sum of the survivors' codes mod ``2^k``,
   which cannot wrap, and dequantises to the survivors' sum.

Fewer than ``t`` survivors (or answers to step 3): the round is refused, with the reason. The
double mask is what keeps a late device private: if its vector arrives after the server asked
for its ``s`` shares, the server can strip the pairwise masks but not ``b``.

This module is the protocol's arithmetic and cryptography on numpy arrays and bytes; the apps
(``clients/client_app.py``, ``server/aggregation.py``) carry it in Flower messages.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # an X25519 public key
SEED_BYTES = 16  # a self-mask seed b, a mask-key seed s, and each Shamir share of one
PRIME = 2 ** 127 - 1  # the Shamir field: a Mersenne prime, so a seed and a share fit 16 bytes
CIPHER_BYTES = 2 * SEED_BYTES + 16  # AES-GCM of (share of b, share of s) with its 16-byte tag
MAX_RING_BITS = 32
MAX_CODE_BITS = 16  # quant-bits 32 means 16-bit codes under secure aggregation
RANGE_GROWTH = 4.0  # a range statistic reports max|u| / range up to this factor


class SecAggError(ValueError):
    """The protocol cannot go on; ``reason`` says why in words (logged, never silent)."""


# ----------------------------------------------------------------------------- the ring
def code_bits(quant_bits: int) -> int:
    """Bits per code before masking: ``quant-bits``, at most 16."""
    return min(int(quant_bits), MAX_CODE_BITS)


def top_code(bits: int) -> int:
    """Largest code: ``2^b - 2``; the grid has an odd number of levels, so 0.0 is one of them."""
    return (1 << bits) - 2


def ring_bits(n: int, bits: int, *, noise_bound: int = 0, top: int | None = None) -> int:
    """Smallest ``k`` with ``n * top + 2 T < 2^k``: the sum of ``n`` codes in ``[0, top]`` (``top``
    defaults to ``2^b - 2``) plus a noise sum in ``[-T, T]`` (distributed DP's, ``T = noise_bound``)
    never wraps in ``Z_(2^k)``: :func:`lift` gives it back exactly."""
    top = top_code(bits) if top is None else int(top)
    k = max(1, (int(n) * top + 2 * int(noise_bound)).bit_length())
    if k > MAX_RING_BITS:
        noise = f" and a noise sum within +-{noise_bound}" if noise_bound else ""
        raise SecAggError(f"{n} devices at {bits} bits{noise} need a {k}-bit ring (at most {MAX_RING_BITS})")
    return k


def lift(total: np.ndarray, k: int, noise_bound: int = 0) -> np.ndarray:
    """The exact integer sum from its residue mod ``2^k``, given that it lies in
    ``[-noise_bound, 2^k - noise_bound)`` (:func:`ring_bits`), as int64; the identity without noise."""
    t, m = int(noise_bound), 1 << int(k)
    return (np.asarray(total, np.uint64).astype(np.int64) + t) % m - t


def pack_ring(values: np.ndarray, k: int) -> np.ndarray:
    """Values ``< 2^k`` packed at ``k`` bits each, least significant bit first (uint8, 1-D)."""
    v = np.asarray(values, np.uint64).reshape(-1)
    bits = ((v[:, None] >> np.arange(k, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def packed_ring_bytes(count: int, k: int) -> int:
    return -(-int(count) * int(k) // 8)


def unpack_ring(packed: np.ndarray, k: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_ring`; refuses a byte count that is not exactly ``count`` values."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != packed_ring_bytes(count, k):
        raise SecAggError(f"{count} values at {k} bits need {packed_ring_bytes(count, k)} bytes, got "
                          f"{packed.dtype} {packed.shape}")
    bits = np.unpackbits(packed, bitorder="little")[: count * k].reshape(count, k).astype(np.uint64)
    return (bits << np.arange(k, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def ring_sum(vectors: Sequence[np.ndarray], k: int) -> np.ndarray:
    total = np.zeros_like(np.asarray(vectors[0], np.uint64))
    for v in vectors:
        total = (total + np.asarray(v, np.uint64)) & np.uint64((1 << k) - 1)
    return total


# ----------------------------------------------------------------------------- the shared grid
def sizes_of(layout: Mapping[str, tuple[int, ...]]) -> list[int]:
    return [int(np.prod(s, dtype=np.int64)) for s in layout.values()]


def input_length(layout: Mapping[str, tuple[int, ...]], *, stats: bool) -> int:
    """Values a device masks: one code per parameter, plus one range statistic per tensor."""
    return sum(sizes_of(layout)) + (len(layout) if stats else 0)


def quantize(update: Mapping[str, np.ndarray], layout: Mapping[str, tuple[int, ...]], ranges: np.ndarray,
             bits: int, rng: np.random.Generator, *, stats: bool, norm_cap: float | None = None) -> np.ndarray:
    """Codes of an update on the grid every device of the round shares: tensor ``m`` clipped to
    ``[-ranges[m], ranges[m]]``, ``2^b - 1`` levels, 0.0 at code ``2^(b-1) - 1``, stochastic
    (unbiased) rounding from ``rng``. Flower's ``quantization.quantize`` does the same with one
    range and numpy's global generator; here each tensor has its range and the draws come from
    the device's named stream, so a run repeats.

    With ``stats``, one more value per tensor: ``max|u_m| / ranges[m]`` as a code of
    ``[0, RANGE_GROWTH]`` (stochastically rounded), which the server learns only summed over the
    survivors and turns into the next round's ranges (:func:`next_ranges`).

    ``norm_cap`` (central DP's clip norm C): stochastic rounding can lift the norm of a clipped
    update above C; if the rounded update's norm exceeds it, the codes are rounded toward zero
    instead, which never increases a magnitude, so the sensitivity the accountant assumes holds
    (the conditional rounding of Kairouz et al. 2021, with a deterministic fallback).
    """
    sizes, z = sizes_of(layout), (1 << (bits - 1)) - 1
    ranges = np.asarray(ranges, np.float64)
    if ranges.shape != (len(sizes),) or not (np.isfinite(ranges).all() and (ranges > 0).all()):
        raise SecAggError(f"expected {len(sizes)} positive finite ranges, got {ranges}")
    flat = np.concatenate([np.asarray(update[k], np.float64).reshape(-1) for k in layout]) if sizes else np.zeros(0)
    r = np.repeat(ranges, sizes)
    x = np.clip(flat, -r, r) / r * z + z  # in [0, 2z]
    codes = np.floor(x)
    codes += rng.random(x.size) < (x - codes)
    if norm_cap is not None and np.linalg.norm((codes - z) * r / z) > norm_cap:
        codes = z + np.trunc(x - z)  # toward zero: |code - z| <= |x - z|
    out = [np.clip(codes, 0, top_code(bits)).astype(np.uint64)]
    if stats:
        starts = np.cumsum([0] + sizes[:-1])
        peaks = np.array([np.abs(flat[s:s + n]).max(initial=0.0) for s, n in zip(starts, sizes)])
        y = np.minimum(peaks / ranges, RANGE_GROWTH) / RANGE_GROWTH * top_code(bits)
        s_codes = np.floor(y)
        s_codes += rng.random(y.size) < (y - s_codes)
        out.append(np.clip(s_codes, 0, top_code(bits)).astype(np.uint64))
    return np.concatenate(out)


def dequantize_sum(total: np.ndarray, n: int, layout: Mapping[str, tuple[int, ...]], ranges: np.ndarray,
                   bits: int, *, stats: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The survivors' float sum from the sum of their ``n`` code vectors, at the layout's shapes,
    and (with ``stats``) the survivors' mean of ``max|u_m| / ranges[m]`` per tensor."""
    sizes, z = sizes_of(layout), (1 << (bits - 1)) - 1
    total = np.asarray(total, np.float64)
    params = sum(sizes)
    if total.shape != (input_length(layout, stats=stats),):
        raise SecAggError(f"a sum of {total.size} values for a layout of {input_length(layout, stats=stats)}")
    step = np.repeat(np.asarray(ranges, np.float64) / z, sizes)
    flat = (total[:params] - n * z) * step
    out, start = {}, 0
    for key, shape in layout.items():
        size = int(np.prod(shape, dtype=np.int64))
        out[key] = flat[start:start + size].reshape(shape)
        start += size
    mean_ratio = total[params:] / (max(n, 1) * top_code(bits)) * RANGE_GROWTH if stats else None
    return out, mean_ratio


def next_ranges(ranges: np.ndarray, mean_ratio: np.ndarray | None) -> np.ndarray:
    """Next round's ranges: the survivors' mean of their per-tensor peak ``max|u_m|`` (a tensor no
    survivor changed keeps its range)."""
    if mean_ratio is None:
        return np.asarray(ranges, np.float64)
    ranges = np.asarray(ranges, np.float64)
    return np.where(mean_ratio > 0, ranges * mean_ratio, ranges)


# ----------------------------------------------------------------------------- keys
@dataclass
class KeyPair:
    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes, round_idx: int) -> KeyPair:
        """The mask key pair of a 16-byte seed: what the server rebuilds for a dropped device."""
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=f"fedkd-secagg|mask-key|round={round_idx}".encode()).derive(seed)
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def exchange(self, peer_public: bytes) -> bytes:
        return self.private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))


def pair_seed(mine: KeyPair, peer_public: bytes, my_id: int, peer_id: int, round_idx: int) -> bytes:
    """The mask seed ``i`` and ``j`` share: HKDF-SHA256 of their X25519 secret, bound to the round and
    the (unordered) pair, so a seed is never reused across rounds or pairs."""
    a, b = sorted((int(my_id), int(peer_id)))
    info = f"fedkd-secagg|round={round_idx}|pair={a},{b}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(mine.exchange(peer_public))


def self_seed(b: bytes, round_idx: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"fedkd-secagg|self|round={round_idx}".encode()).derive(b)


def _keystream(seed: bytes, n: int) -> np.ndarray:
    """The first ``n`` 32-bit words of ChaCha20 under ``seed`` (zero nonce; each seed is used once)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (4 * n)), dtype="<u4")


def prg(seed: bytes, n: int, k: int = 32) -> np.ndarray:
    """``n`` pseudo-random values of ``Z_(2^k)``: the ChaCha20 keystream of a 32-byte ``seed``, 32-bit
    words cut to ``k`` bits. Flower's ``pseudo_rand_gen`` folds the seed to 32 bits for numpy's
    Mersenne Twister, which a server could brute-force."""
    return _keystream(seed, n).astype(np.uint64) & np.uint64((1 << k) - 1)


def _channel_key(mine: KeyPair, peer_public: bytes, *, sender: int, receiver: int, sender_mask_key: bytes,
                 round_idx: int) -> bytes:
    """AES-256 key of the shares ``sender`` sends ``receiver``: X25519 of their long-term keys, HKDF
    bound to the round, the direction and the sender's fresh mask public key (so a key, and the
    zero nonce with it, is never used twice)."""
    info = f"fedkd-secagg|shares|round={round_idx}|{sender}->{receiver}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(sender_mask_key),
                info=info).derive(mine.exchange(peer_public))


# ----------------------------------------------------------------------------- Shamir
def new_seed() -> bytes:
    """A fresh 16-byte secret (a ``b`` or an ``s``): uniform below :data:`PRIME` from the operating
    system's generator (``secrets``), 127 bits of entropy; seeds feed HKDF, never a cipher as is."""
    return secrets.randbelow(PRIME).to_bytes(SEED_BYTES, "big")


def _element(raw: bytes, what: str) -> int:
    if len(raw) != SEED_BYTES:
        raise SecAggError(f"a {what} is {SEED_BYTES} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise SecAggError(f"a {what} must be below 2^127 - 1 (the Shamir field's prime)")
    return value


def split(secret: bytes, t: int, n: int) -> list[bytes]:
    """``n`` Shamir shares of a 16-byte secret, any ``t`` of which rebuild it (share ``x`` is
    ``shares[x - 1]``, the value at ``x`` of a random polynomial of degree ``t - 1`` whose constant
    is the secret), over GF(2^127 - 1) with Python integers.

    Why not pycryptodome's GF(2^128) ``Shamir`` (what Flower's ``create_shares`` wraps): its field
    multiplication is pure Python at about 13 us, and a round of 150 devices splits 300 seeds
    into 150 shares and rebuilds 150 of them from 75: 50 s a round on two cores (measured), where
    integers modulo a Mersenne prime take milliseconds. A prime field is Bonawitz et al.'s own
    choice; a share still fits the 16 bytes of a seed."""
    value = _element(secret, "secret")
    if not 1 <= t <= n:
        raise SecAggError(f"threshold {t} is not within 1..{n}")
    if n >= PRIME:
        raise SecAggError(f"{n} shares: the field has only {PRIME - 1} points")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SEED_BYTES, "big"))
    return shares


@functools.lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights that turn the values at ``xs`` into the polynomial's value at 0; cached, since
    the server rebuilds every seed of a round from the same responders."""
    weights = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def combine(shares: Mapping[int, bytes], t: int) -> bytes:
    """The secret from ``t`` or more shares ``{x: share}`` (the first ``t`` by x are used)."""
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} shares, {t} needed")
    xs = tuple(sorted(int(x) for x in shares)[:t])
    if xs and not 1 <= xs[0] <= xs[-1] < PRIME:
        raise SecAggError(f"share positions must be within 1..2^127 - 2, got {xs[0]}..{xs[-1]}")
    values = [_element(bytes(shares[x]), "share") for x in xs]
    secret = sum(w * v for w, v in zip(_lagrange_at_zero(xs), values)) % PRIME
    return secret.to_bytes(SEED_BYTES, "big")


def threshold(n: int, fraction: float) -> int:
    """``t = ceil(fraction * n)``, at least 1: the round survives up to ``n - t`` dropouts."""
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


# ----------------------------------------------------------------------------- SecAgg+'s graph
def neighbourhoods(ids: Sequence[int], shares: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """Who masks with and holds shares of whom: each device's neighbourhood, itself included, as a
    sorted list (its Shamir x-coordinates are the 1-based positions in it).

    ``shares`` (odd) below the number of devices: SecAgg+'s sparse graph (Bell et al. CCS 2020), as
    Flower's ``SecAggPlusWorkflow`` builds it: the devices in a random order (``rng``, the server's),
    each joined to the ``shares // 2`` before and after it on that ring, so a device's keys, shares
    and unmask answers cost ``shares`` peers instead of the round's ``n`` and the relation is
    symmetric. Otherwise (0, or at least ``n``): every device of the round (SecAgg's complete graph)."""
    ids = sorted(int(i) for i in ids)
    n = len(ids)
    if shares <= 0 or shares >= n:
        return {i: ids for i in ids}
    half = int(shares) // 2
    order = [ids[p] for p in rng.permutation(n)]
    return {v: sorted({order[(x + o) % n] for o in range(-half, half + 1)}) for x, v in enumerate(order)}


def groups(ids: Sequence[int], size: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """Each device's group, itself included, as a sorted list (the same shape as
    :func:`neighbourhoods`): the devices in a random order (``rng``, the server's), cut into
    ``ceil(n / size)`` groups whose sizes differ by at most one, so none holds more than ``size``;
    but never fewer than 2 in a group (with 3 devices and ``size`` 2, one group of 3), since a
    group's sum is what the server learns.

    Why groups: each group is a secure sum of its own, whose ring needs the headroom of its
    members' codes only (``ring_bits(size, b)``) and whose keys and shares cost its members only,
    so the masked uploads stay near the plain ones' size however many devices a round has; the
    price is that the server learns every group's sum, not just the round's."""
    ids = sorted(int(i) for i in ids)
    n = len(ids)
    count = max(1, min(-(-n // int(size)), n // 2))
    order = [ids[p] for p in rng.permutation(n)]
    out = {}
    for part in np.array_split(np.asarray(order, dtype=np.int64), count):
        members = sorted(int(i) for i in part)
        out.update({i: members for i in members})
    return out


def refusal_chance(n: int, shares: int, fraction: float, dropout: float, *, group: int = 0) -> float:
    """An upper bound on the chance that a round of ``n`` devices is refused when each drops after
    sharing with probability ``dropout``, independently: fewer than ``t`` survivors, or (SecAgg+)
    some device whose neighbourhood keeps fewer than its ``share_t`` answers (a union bound over the
    ``n`` neighbourhoods). What sizes ``secagg-shares``: a neighbourhood must be large enough that
    its losses stay below ``shares - share_t`` (docs/privacy.md has the table). With ``group``
    (:func:`groups`): the chance that some group is refused (a union bound over the groups; a
    refused group costs its own devices only)."""
    def fewer_alive(m: int, t: int) -> float:
        return sum(math.comb(m, a) * (1 - dropout) ** a * dropout ** (m - a) for a in range(t))
    if group and n:  # the sizes of groups() do not depend on the draw
        parts = {tuple(g) for g in groups(range(n), group, np.random.default_rng(0)).values()}
        return min(1.0, sum(fewer_alive(len(g), threshold(len(g), fraction)) for g in parts))
    whole = fewer_alive(n, threshold(n, fraction))
    if shares <= 0 or shares >= n:
        return whole
    return min(1.0, whole + n * fewer_alive(shares, threshold(shares, fraction)))


# ----------------------------------------------------------------------------- the device's side
@dataclass
class Shared:
    """What a device keeps between step 1 and step 3 (in its node state) and what it sends."""

    ids: list[int]
    t: int
    b: bytes  # self-mask seed
    s: bytes  # mask-key seed
    own_b: bytes  # its own shares of b and s (x = its position)
    own_s: bytes
    reply: bytes  # s_pk || one ciphertext per other device, in ``ids`` order


def share(enc: KeyPair, my_id: int, ids: Sequence[int], enc_keys: Sequence[bytes], t: int, round_idx: int,
          *, b: bytes | None = None, s: bytes | None = None) -> Shared:
    """Step 1 on device ``my_id``: fresh seeds, their shares, encrypted for each other device."""
    ids = [int(i) for i in ids]
    _check_ids(ids, my_id)
    if len(enc_keys) != len(ids) or bytes(enc_keys[ids.index(my_id)]) != enc.public_bytes:
        raise SecAggError("the server listed an encryption key for this device that is not its own")
    b = new_seed() if b is None else b
    s = new_seed() if s is None else s
    b_shares, s_shares = split(b, t, len(ids)), split(s, t, len(ids))
    mask_pub = KeyPair.from_seed(s, round_idx).public_bytes
    parts = [mask_pub]
    for x, (j, key) in enumerate(zip(ids, enc_keys)):
        if j == my_id:
            continue
        k = _channel_key(enc, key, sender=my_id, receiver=j, sender_mask_key=mask_pub, round_idx=round_idx)
        parts.append(AESGCM(k).encrypt(b"\0" * 12, b_shares[x] + s_shares[x], None))
    me = ids.index(my_id)
    return Shared(ids, t, b, s, b_shares[me], s_shares[me], b"".join(parts))


def split_reply(blob: bytes, n: int) -> tuple[bytes, list[bytes]]:
    """A step-1 reply: the mask public key and the ``n - 1`` ciphertexts (raises if malformed)."""
    if len(blob) != KEY_BYTES + (n - 1) * CIPHER_BYTES:
        raise SecAggError(f"a share reply for {n} devices is {KEY_BYTES + (n - 1) * CIPHER_BYTES} bytes, "
                          f"got {len(blob)}")
    return blob[:KEY_BYTES], [blob[KEY_BYTES + i * CIPHER_BYTES: KEY_BYTES + (i + 1) * CIPHER_BYTES]
                              for i in range(n - 1)]


def mask(codes: np.ndarray, my_id: int, b: bytes, s: bytes, mask_keys: Mapping[int, bytes], k: int,
         round_idx: int) -> np.ndarray:
    """Step 2: ``codes + PRG(b) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)`` mod ``2^k``;
    ``mask_keys`` maps every device of ``U1`` (this one included) to its mask public key."""
    if my_id not in mask_keys:
        raise SecAggError(f"device {my_id} is not among this round's key holders {sorted(mask_keys)}")
    mine = KeyPair.from_seed(s, round_idx)
    if bytes(mask_keys[my_id]) != mine.public_bytes:
        raise SecAggError("the server listed a mask key for this device that is not its own")
    # k <= 32, so 2^k divides 2^32: sum in uint32, whose wrap-around is harmless, and cut to k bits
    # once at the end (half the memory traffic of uint64, no copy of each keystream)
    out = np.asarray(codes, np.uint64).astype(np.uint32) + _keystream(self_seed(b, round_idx), len(codes))
    for j, pub in sorted(mask_keys.items()):
        if j != my_id:
            m = _keystream(pair_seed(mine, pub, my_id, j, round_idx), len(codes))
            out = np.add(out, m, out=out) if j > my_id else np.subtract(out, m, out=out)
    return (out & np.uint32((1 << k) - 1)).astype(np.uint64)


def reveal(enc: KeyPair, my_id: int, kept: Shared, enc_keys: Sequence[bytes], mask_keys: Mapping[int, bytes],
           survivors: Sequence[int], ciphertexts: Mapping[int, bytes], round_idx: int) -> dict[int, bytes]:
    """Step 3 on a survivor: for each device ``j`` of ``U1`` one share, of ``b_j`` if ``j`` is a
    survivor, of ``s_j`` if not; never both. ``ciphertexts`` holds what each ``j != me`` sent this
    device in step 1; ``mask_keys`` are ``U1``'s mask public keys from the train message."""
    ids, me = kept.ids, int(my_id)
    alive, holders = {int(j) for j in survivors}, {int(j) for j in mask_keys}
    if me not in alive:
        raise SecAggError("this device is not among the survivors the server named")
    if not alive <= holders or not holders <= set(ids):
        raise SecAggError("the survivors are not a subset of the devices that shared keys")
    if len(alive) < kept.t:
        raise SecAggError(f"{len(alive)} survivors, threshold {kept.t}: refusing to reveal shares")
    out = {}
    for j in sorted(holders):
        if j == me:
            out[j] = kept.own_b
            continue
        if j not in ciphertexts:
            raise SecAggError(f"no ciphertext from device {j}")
        k = _channel_key(enc, enc_keys[ids.index(j)], sender=j, receiver=me, sender_mask_key=mask_keys[j],
                         round_idx=round_idx)
        plain = AESGCM(k).decrypt(b"\0" * 12, bytes(ciphertexts[j]), None)
        out[j] = plain[:SEED_BYTES] if j in alive else plain[SEED_BYTES:]
    return out


# ----------------------------------------------------------------------------- the server's side
def unmask(masked: Mapping[int, np.ndarray], mask_keys: Mapping[int, bytes], ids: Sequence[int],
           revealed: Mapping[int, Mapping[int, bytes]], t: int, k: int, round_idx: int, *,
           graph: Mapping[int, Sequence[int]] | None = None, share_t: int | None = None) -> np.ndarray:
    """The exact sum mod ``2^k`` of the survivors' codes (``masked``: survivor -> its masked vector),
    from ``revealed`` (responder -> {device: share}). At least ``t`` survivors and ``t`` responders
    are needed, and ``share_t`` (default ``t``) shares of each secret, from the owner's
    neighbourhood in ``graph`` (:func:`neighbourhoods`; default: every device of ``ids``)."""
    ids = [int(i) for i in ids]
    share_t = t if share_t is None else int(share_t)
    alive, holders = sorted(int(i) for i in masked), sorted(int(i) for i in mask_keys)
    if not set(alive) <= set(holders):
        raise SecAggError(f"masked vectors from {sorted(set(alive) - set(holders))}, who shared no keys")
    if len(alive) < t:
        raise SecAggError(f"only {len(alive)} of the {len(holders)} devices that shared keys sent a masked update; "
                          f"the threshold is {t}")
    if len(revealed) < t:
        raise SecAggError(f"only {len(revealed)} survivors revealed their shares; the threshold is {t}")
    n = len(next(iter(masked.values())))
    total = ring_sum([masked[i] for i in alive], k)
    top = np.uint64(1 << k)
    for i in holders:
        near = ids if graph is None else [int(j) for j in graph[i]]
        shares = {near.index(r) + 1: got[i] for r, got in revealed.items() if i in got and r in near}
        try:
            secret = combine(shares, share_t)
        except SecAggError as exc:
            raise SecAggError(f"device {i}'s seeds: {exc} from its neighbours") from None
        if i in masked:  # a survivor: remove its self mask
            total = total + (top - prg(self_seed(secret, round_idx), n, k))
        else:  # dropped: remove the pairwise masks it left in each survivor's vector
            gone = KeyPair.from_seed(secret, round_idx)
            if gone.public_bytes != bytes(mask_keys[i]):
                raise SecAggError(f"the shares of device {i}'s mask key rebuild a different key")
            for j in (alive if graph is None else sorted(set(alive) & set(near))):
                m = prg(pair_seed(gone, mask_keys[j], i, j, round_idx), n, k)
                total = total + (top - m) if i > j else total + m  # j added +m for i > j, -m for i < j
        total &= top - np.uint64(1)
    return total


def _check_ids(ids: list[int], my_id: int) -> None:
    if ids != sorted(set(ids)):
        raise SecAggError("malformed device list: expected sorted unique ids")
    if my_id not in ids:
        raise SecAggError(f"device {my_id} is not among this round's devices {ids}")


# ----------------------------------------------------------------------------- one round in one process
@dataclass
class Round:
    """A whole round in one process (tests, docs): the recovered sum and what it cost."""

    total: np.ndarray  # the survivors' code sum, mod 2^k
    k: int
    t: int
    survivors: list[int]
    graph: dict[int, list[int]]  # each device's neighbourhood, itself included
    share_t: int  # shares that rebuild one secret


def simulate_round(codes: Mapping[int, np.ndarray], bits: int, round_idx: int, *, threshold_fraction: float = 0.5,
                   drop_after_sharing: Sequence[int] = (), drop_before_sharing: Sequence[int] = (),
                   silent_in_unmask: Sequence[int] = (), noise_bound: int = 0, top: int | None = None,
                   shares: int = 0, rng: np.random.Generator | None = None) -> Round:
    """Every step of the protocol with real keys and ciphertexts, each device seeing only what the
    apps send it; devices in ``drop_after_sharing`` send no masked vector, those in
    ``silent_in_unmask`` send it but do not reveal shares. ``noise_bound``, ``top``: the ring of
    :func:`ring_bits` for noisy codes (distributed DP), whose values ``codes`` must already be
    reduced into it. ``shares``: SecAgg+'s graph (:func:`neighbourhoods`, drawn from ``rng``)."""
    ids = sorted(int(i) for i in codes)
    enc = {i: KeyPair.generate() for i in ids}
    key_of = {i: enc[i].public_bytes for i in ids}
    graph = neighbourhoods(ids, shares, rng if rng is not None else np.random.default_rng(round_idx))
    t = threshold(len(ids), threshold_fraction)
    share_t = threshold(len(graph[ids[0]]), threshold_fraction) if ids else 0
    kept, inbox, mask_keys = {}, {i: {} for i in ids}, {}
    for i in ids:
        if i in drop_before_sharing:
            continue
        near = graph[i]
        kept[i] = share(enc[i], i, near, [key_of[j] for j in near], share_t, round_idx)
        pub, cts = split_reply(kept[i].reply, len(near))
        mask_keys[i] = pub
        for j, ct in zip([j for j in near if j != i], cts):
            inbox[j][i] = ct
    k = ring_bits(len(mask_keys), bits, noise_bound=noise_bound, top=top)

    def near_keys(i):  # the mask keys device i uses: its neighbours' among all holders'
        return {j: key for j, key in mask_keys.items() if j in graph[i]}

    masked = {i: mask(codes[i], i, kept[i].b, kept[i].s, near_keys(i), k, round_idx)
              for i in mask_keys if i not in drop_after_sharing}
    masked = {i: unpack_ring(pack_ring(v, k), k, len(v)) for i, v in masked.items()}  # through the wire format
    survivors = sorted(masked)
    revealed = {i: reveal(enc[i], i, kept[i], [key_of[j] for j in graph[i]], near_keys(i),
                          [j for j in survivors if j in graph[i]],
                          {j: ct for j, ct in inbox[i].items() if j in mask_keys}, round_idx)
                for i in masked if i not in silent_in_unmask}
    total = unmask(masked, mask_keys, ids, revealed, t, k, round_idx, graph=graph, share_t=share_t)
    return Round(total, k, t, survivors, graph, share_t)
