"""Pairwise-mask secure aggregation: the server's sum is the plain sum, one vector reveals nothing."""

import numpy as np
import pytest

from fedkd.secagg import KeyPair, decode, encode, mask, pair_seed, prg, secure_sum, unmask_sum


def _round(n_clients=5, size=2000, seed=0, frac_bits=16, round_idx=3):
    rng = np.random.default_rng(seed)
    updates = {i * 7 + 1: rng.normal(0, 0.1, size) for i in range(n_clients)}  # ids need not be 0..n-1
    keys = {i: KeyPair.generate() for i in updates}
    pubs = {i: k.public_bytes for i, k in keys.items()}
    masked = {i: mask(encode(u, frac_bits), keys[i], i, pubs, round_idx) for i, u in updates.items()}
    return updates, keys, pubs, masked


def test_the_masked_sum_is_exactly_the_sum_of_the_encoded_updates():
    updates, keys, _, masked = _round()
    total = unmask_sum(masked, list(keys))
    exact = np.zeros_like(total)
    for u in updates.values():
        exact = exact + encode(u, 16)
    np.testing.assert_array_equal(total, exact)  # masks cancel bit for bit
    plain = sum(updates.values())
    assert np.abs(decode(total, 16) - plain).max() <= len(updates) * 0.5 / 2 ** 16  # fixed-point rounding only


def test_secure_sum_equals_the_plain_sum():
    rng = np.random.default_rng(1)
    updates = {i: rng.normal(size=500) for i in range(4)}
    np.testing.assert_allclose(secure_sum(updates, round_idx=1), sum(updates.values()), atol=4 * 2 ** -16)


def test_a_single_masked_update_reveals_nothing_about_it():
    updates, _, _, masked = _round(size=20000)
    for i, u in updates.items():
        alone = decode(masked[i], 16)
        # decoded alone it is noise spread over the whole fixed-point range, unrelated to the update
        assert np.abs(alone - u).mean() > 1e3 * np.abs(u).mean()
        assert abs(np.corrcoef(alone, u)[0, 1]) < 0.05
        # and its words look uniform on Z_(2^32): each of 16 buckets of the top bits holds ~1/16
        counts = np.bincount(masked[i] >> 28, minlength=16) / masked[i].size
        assert np.abs(counts - 1 / 16).max() < 0.01


def test_the_two_ends_of_a_pair_derive_the_same_mask_and_nobody_else_does():
    a, b, server = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    s_ab = pair_seed(a, b.public_bytes, 1, 2, round_idx=5)
    assert s_ab == pair_seed(b, a.public_bytes, 2, 1, round_idx=5)
    assert s_ab != pair_seed(a, b.public_bytes, 1, 2, round_idx=6)  # fresh masks every round
    # the server knows both public keys but not a private key: its own secret gives other seeds
    assert pair_seed(server, a.public_bytes, 1, 2, 5) != s_ab and pair_seed(server, b.public_bytes, 1, 2, 5) != s_ab
    assert not np.array_equal(prg(s_ab, 8), prg(pair_seed(a, b.public_bytes, 1, 2, 6), 8))


def test_a_dropout_after_the_key_exchange_is_refused_not_silently_wrong():
    updates, keys, _, masked = _round(n_clients=4)
    dropped = dict(list(masked.items())[:-1])
    with pytest.raises(ValueError, match="cannot be removed"):
        unmask_sum(dropped, list(keys))
    # and it would indeed be wrong: the dropped client's masks stay in the others' vectors
    partial = np.zeros_like(next(iter(masked.values())))
    for v in dropped.values():
        partial = partial + v
    expected = sum(encode(u, 16) for i, u in list(updates.items())[:-1])
    assert not np.array_equal(partial, expected)


def test_fixed_point_range_is_checked():
    with pytest.raises(ValueError, match="fixed-point range"):
        encode(np.array([40000.0]), 16)
    np.testing.assert_array_equal(decode(encode(np.array([-1.5, 0.0, 2.25]), 8), 8), [-1.5, 0.0, 2.25])


def test_private_keys_survive_a_round_trip_through_bytes():
    k = KeyPair.generate()
    assert KeyPair.from_private_bytes(k.private_bytes()).public_bytes == k.public_bytes
