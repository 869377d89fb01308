"""Secure aggregation with dropout recovery (fedkd.secagg), on arrays: Shamir shares, the ring,
the shared grid, and whole rounds with real keys and ciphertexts in one process."""

import math

import numpy as np
import pytest

from fedkd import secagg
from fedkd.secagg import SecAggError


# ----------------------------------------------------------------------------- Shamir
def test_any_t_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(16))
    shares = secagg.split(secret, 4, 7)
    assert len(shares) == 7 and all(len(s) == secagg.SEED_BYTES for s in shares)
    for xs in ([1, 2, 3, 4], [7, 5, 3, 1], [2, 3, 4, 5, 6, 7]):
        assert secagg.combine({x: shares[x - 1] for x in xs}, 4) == secret
    with pytest.raises(SecAggError, match="3 shares, 4 needed"):
        secagg.combine({x: shares[x - 1] for x in (1, 2, 3)}, 4)
    # three points of a degree-3 polynomial say nothing: interpolating them gives another value
    assert secagg.combine({x: shares[x - 1] for x in (1, 2, 3)}, 3) != secret
    assert secagg.split(secret, 1, 1) == [secret]  # t = 1, n = 1: the one device holds it
    with pytest.raises(SecAggError, match="threshold 5"):
        secagg.split(secret, 5, 4)


def test_secrets_and_shares_live_below_the_fields_prime():
    top = (secagg.PRIME - 1).to_bytes(16, "big")  # the largest element: still shared exactly
    shares = secagg.split(top, 3, 5)
    assert secagg.combine({x: shares[x - 1] for x in (5, 2, 4)}, 3) == top
    with pytest.raises(SecAggError, match="below 2\\^127 - 1"):
        secagg.split(secagg.PRIME.to_bytes(16, "big"), 2, 3)  # not an element: refused, not wrapped
    with pytest.raises(SecAggError, match="share must be below"):
        secagg.combine({1: shares[0], 2: b"\xff" * 16, 3: shares[2]}, 3)  # a malformed share is refused
    seeds = {secagg.new_seed() for _ in range(200)}
    assert len(seeds) == 200 and all(int.from_bytes(b, "big") < secagg.PRIME for b in seeds)
    # fresh coefficients each time: the same secret is shared differently, rebuilt the same
    again = secagg.split(top, 3, 5)
    assert again != shares and secagg.combine({x: again[x - 1] for x in (1, 3, 5)}, 3) == top


def test_the_threshold_is_a_fraction_of_the_devices_at_least_one():
    assert [secagg.threshold(n, 0.5) for n in (1, 2, 9, 10, 48)] == [1, 1, 5, 5, 24]
    assert secagg.threshold(10, 1.0) == 10 and secagg.threshold(10, 0.01) == 1


# ----------------------------------------------------------------------------- the ring
def test_the_ring_has_exactly_the_headroom_the_sum_needs():
    assert secagg.ring_bits(1, 8) == 8 and secagg.ring_bits(8, 8) == 11 and secagg.ring_bits(10, 8) == 12
    assert secagg.ring_bits(48, 8) == 14 and secagg.ring_bits(10, 4) == 8 and secagg.ring_bits(3, 2) == 3
    for n, bits in ((1, 8), (8, 8), (9, 8), (10, 4), (48, 8), (5, 2)):
        k = secagg.ring_bits(n, bits)
        assert n * secagg.top_code(bits) < 2 ** k <= 2 * n * secagg.top_code(bits)  # fits, and no bit to spare
    with pytest.raises(SecAggError, match="ring"):
        secagg.ring_bits(2 ** 17, 16)


@pytest.mark.parametrize("k", [1, 3, 8, 11, 12, 14, 17, 32])
def test_ring_values_pack_at_k_bits_and_come_back(k):
    rng = np.random.default_rng(k)
    v = rng.integers(0, 2 ** k, 1001, dtype=np.uint64)
    packed = secagg.pack_ring(v, k)
    assert packed.dtype == np.uint8 and packed.size == secagg.packed_ring_bytes(1001, k) == -(-1001 * k // 8)
    np.testing.assert_array_equal(secagg.unpack_ring(packed, k, 1001), v)
    with pytest.raises(SecAggError, match="bytes"):
        secagg.unpack_ring(packed[:-1], k, 1001)


def test_modular_wrap_around_masked_vectors_wrap_and_the_sum_does_not():
    """Every device at the top code: the largest sum the ring must hold. Each masked vector wraps
    around 2^k many times over; the recovered sum is exact."""
    bits, n = 8, 9
    codes = {i: np.full(3000, secagg.top_code(bits), np.uint64) for i in range(n)}
    rnd = secagg.simulate_round(codes, bits, round_idx=1)
    assert rnd.k == 12 and n * secagg.top_code(bits) == 2286 < 2 ** 12
    np.testing.assert_array_equal(rnd.total, np.full(3000, n * secagg.top_code(bits)))
    # one bit less and the same sum wraps: that is why the headroom is there
    assert (n * secagg.top_code(bits)) % 2 ** (rnd.k - 1) != n * secagg.top_code(bits)
    # in Z_(2^k) arithmetic, subtraction below zero wraps to the top and back
    a, b = np.array([3], np.uint64), np.array([5], np.uint64)
    top = np.uint64(2 ** 12)
    assert int(secagg.ring_sum([a, top - b], 12)[0]) == 2 ** 12 - 2
    assert int(secagg.ring_sum([a, top - b, b], 12)[0]) == 3


# ----------------------------------------------------------------------------- the shared grid
LAYOUT = {"w": (30, 8), "b": (8,)}


def _update(rng, scale=0.3):
    return {k: rng.normal(0, scale, s).astype(np.float32) for k, s in LAYOUT.items()}


def test_the_grid_has_zero_as_a_level_and_rounds_without_bias():
    ranges, bits = np.array([1.0, 0.5]), 8
    rng = np.random.default_rng(0)
    zero = {k: np.zeros(s, np.float32) for k, s in LAYOUT.items()}
    codes = secagg.quantize(zero, LAYOUT, ranges, bits, rng, stats=False)
    assert (codes == 127).all()  # 0.0 is exactly code 2^(b-1) - 1
    u = _update(rng, 0.1)
    draws = [secagg.dequantize_sum(secagg.quantize(u, LAYOUT, ranges, bits, np.random.default_rng(s), stats=False),
                                   1, LAYOUT, ranges, bits, stats=False)[0] for s in range(400)]
    for k in LAYOUT:
        mean = np.mean([d[k] for d in draws], axis=0)
        assert np.abs(mean - u[k]).max() < 4 * ranges[list(LAYOUT).index(k)] / 127 / np.sqrt(400)
    big = {k: np.full(s, 9.0, np.float32) for k, s in LAYOUT.items()}  # clipped to the range
    total, _ = secagg.dequantize_sum(secagg.quantize(big, LAYOUT, ranges, bits, rng, stats=False), 1, LAYOUT,
                                     ranges, bits, stats=False)
    assert np.allclose(total["w"], 1.0) and np.allclose(total["b"], 0.5)


def test_range_statistics_give_the_survivors_mean_peak():
    rng = np.random.default_rng(1)
    ranges, bits = np.array([1.0, 1.0]), 8
    ups = [_update(rng, s) for s in (0.1, 0.2, 0.3)]
    codes = [secagg.quantize(u, LAYOUT, ranges, bits, rng, stats=True) for u in ups]
    assert len(codes[0]) == secagg.input_length(LAYOUT, stats=True) == 30 * 8 + 8 + 2
    _, ratio = secagg.dequantize_sum(sum(codes), 3, LAYOUT, ranges, bits, stats=True)
    peaks = np.mean([[np.abs(u[k]).max() for k in LAYOUT] for u in ups], axis=0)
    np.testing.assert_allclose(ratio, peaks, atol=2 * secagg.RANGE_GROWTH / 254)
    np.testing.assert_allclose(secagg.next_ranges(ranges, ratio), ratio)
    np.testing.assert_allclose(secagg.next_ranges(ranges, np.array([0.0, 0.5])), [1.0, 0.5])  # 0: keep


def test_under_central_dp_rounding_never_lifts_the_norm_above_the_clip():
    rng = np.random.default_rng(2)
    ranges, bits, cap = np.array([0.5, 0.5]), 2, 0.5  # coarse levels: stochastic rounding often overshoots
    u = _update(rng, 0.02)
    norm = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in u.values()))
    u = {k: v * (cap / norm) for k, v in u.items()}  # exactly at the clip norm
    over = 0
    for s in range(20):
        plain = secagg.quantize(u, LAYOUT, ranges, bits, np.random.default_rng(s), stats=False)
        capped = secagg.quantize(u, LAYOUT, ranges, bits, np.random.default_rng(s), stats=False, norm_cap=cap)
        back = lambda c: secagg.dequantize_sum(c, 1, LAYOUT, ranges, bits, stats=False)[0]  # noqa: E731
        n_plain = np.sqrt(sum((v ** 2).sum() for v in back(plain).values()))
        over += n_plain > cap
        assert np.sqrt(sum((v ** 2).sum() for v in back(capped).values())) <= cap + 1e-9
    assert over > 0


# ----------------------------------------------------------------------------- whole rounds
def _codes(n=10, size=2000, bits=8, seed=0):
    rng = np.random.default_rng(seed)
    return {i * 7 + 1: rng.integers(0, secagg.top_code(bits) + 1, size).astype(np.uint64) for i in range(n)}


@pytest.mark.parametrize("dropped", [0.1, 0.3, 0.5])
def test_after_dropouts_the_aggregate_is_the_survivors_plain_sum_bit_for_bit(dropped):
    """10 devices share their seeds; 10%, 30%, 50% of them then send nothing. The server gets the
    survivors' sum exactly, and, through the shared grid, the sum of their quantised updates."""
    rng = np.random.default_rng(3)
    bits, ranges = 8, np.array([0.8, 0.4])
    ids = [i * 7 + 1 for i in range(10)]
    updates = {i: _update(rng) for i in ids}
    codes = {i: secagg.quantize(updates[i], LAYOUT, ranges, bits, np.random.default_rng(i), stats=True) for i in ids}
    gone = list(rng.choice(ids, int(round(dropped * 10)), replace=False))
    rnd = secagg.simulate_round(codes, bits, round_idx=4, drop_after_sharing=gone)
    assert rnd.t == 5 and rnd.k == 12 and rnd.survivors == sorted(set(ids) - set(gone))
    plain = sum(codes[i] for i in rnd.survivors)
    np.testing.assert_array_equal(rnd.total, plain)  # bit for bit
    got, _ = secagg.dequantize_sum(rnd.total, len(rnd.survivors), LAYOUT, ranges, bits, stats=True)
    each = [secagg.dequantize_sum(codes[i], 1, LAYOUT, ranges, bits, stats=True)[0] for i in rnd.survivors]
    for k in LAYOUT:
        np.testing.assert_allclose(got[k], sum(e[k] for e in each), rtol=0, atol=1e-9)


def test_below_the_threshold_the_round_is_refused_with_its_reason():
    codes = _codes()
    ids = sorted(codes)
    with pytest.raises(SecAggError, match="threshold 5"):  # 6 of 10 dropped: the survivors refuse to reveal
        secagg.simulate_round(codes, 8, 1, drop_after_sharing=ids[:6])
    # the server's own check, whatever the devices do: 4 masked vectors, t = 5
    with pytest.raises(SecAggError, match=r"only 4 of the 10 devices .* threshold is 5"):
        secagg.unmask({i: codes[i] for i in ids[:4]}, {i: b"\0" * 32 for i in ids}, ids, {}, 5, 12, 1)
    # enough vectors, too few answers to the unmask step
    with pytest.raises(SecAggError, match=r"only 4 survivors revealed"):
        secagg.simulate_round(codes, 8, 1, drop_after_sharing=ids[:2], silent_in_unmask=ids[2:6])
    # a survivor that goes quiet in the unmask step still counts, as long as t answer
    rnd = secagg.simulate_round(codes, 8, 1, drop_after_sharing=ids[:2], silent_in_unmask=ids[2:5])
    np.testing.assert_array_equal(rnd.total, sum(codes[i] for i in ids[2:]))


# ----------------------------------------------------------------------------- SecAgg+'s graph
def test_neighbourhoods_are_symmetric_rings_of_the_given_size_or_everyone():
    ids = [i * 3 + 2 for i in range(20)]
    graph = secagg.neighbourhoods(ids, 5, np.random.default_rng(1))
    assert sorted(graph) == ids
    for i, near in graph.items():
        assert len(near) == 5 and i in near and near == sorted(near)
        assert all(i in graph[j] for j in near)  # j masks with i if and only if i masks with j
    # a ring: following the order, every device has exactly two "next" neighbours on each side
    assert sum(len(near) - 1 for near in graph.values()) == 20 * 4
    assert secagg.neighbourhoods(ids, 5, np.random.default_rng(2)) != graph  # a new order each round
    for shares in (0, 21, 41):  # 0, or a neighbourhood as large as the round: everyone
        assert all(near == ids for near in secagg.neighbourhoods(ids, shares, np.random.default_rng(1)).values())
    assert all(len(near) == 19 for near in secagg.neighbourhoods(ids, 19, np.random.default_rng(1)).values())


def _ring(ids, seed):
    """The ring order :func:`secagg.neighbourhoods` draws from ``default_rng(seed)``."""
    return [ids[p] for p in np.random.default_rng(seed).permutation(len(ids))]


@pytest.mark.parametrize("dropped", [0.1, 0.3, 0.5])
def test_with_secaggplus_neighbourhoods_dropouts_still_give_the_exact_survivors_sum(dropped):
    """20 devices, each masking with and sharing among 7 (itself included, threshold 0.4: 3 shares
    rebuild a seed, 8 survivors make a round): with 10%, 30%, 50% dropping after sharing, spread
    along the ring so that every neighbourhood keeps 3 answers, the survivors' sum is exact."""
    codes = _codes(n=20, size=500)
    ids = sorted(codes)
    order = _ring(ids, 5)
    gone = order[1::2][:int(round(dropped * 20))]  # every other device along the ring
    rnd = secagg.simulate_round(codes, 8, 3, drop_after_sharing=gone, shares=7, rng=np.random.default_rng(5),
                                threshold_fraction=0.4)
    assert rnd.share_t == 3 and rnd.t == 8 and rnd.survivors == sorted(set(ids) - set(gone))
    for x, i in enumerate(order):  # the ring the server drew: 3 on each side
        assert rnd.graph[i] == sorted(order[(x + o) % 20] for o in range(-3, 4))
    np.testing.assert_array_equal(rnd.total, sum(codes[i] for i in ids if i not in gone))


def test_with_neighbourhoods_a_secret_its_neighbours_cannot_rebuild_refuses_the_round():
    """Three neighbours in a row drop: each one's mask key is shared among 5 devices of which 2
    answer, below the 3 needed; the round is refused, naming a device, though 17 of 20 survived."""
    codes = _codes(n=20, size=50)
    ids = sorted(codes)
    order = _ring(ids, 6)
    with pytest.raises(SecAggError, match=rf"device ({'|'.join(map(str, order[7:10]))})'s seeds: 2 shares, 3 needed from its neighbours"):
        secagg.simulate_round(codes, 8, 1, drop_after_sharing=order[7:10], shares=5, rng=np.random.default_rng(6))


def test_a_neighbourhood_costs_a_device_its_size_not_the_rounds():
    """Keys and shares up, per device: the mask key and one 48-byte ciphertext per other member of
    its neighbourhood, whatever the round's size."""
    enc = {i: secagg.KeyPair.generate() for i in range(40)}
    graph = secagg.neighbourhoods(list(enc), 7, np.random.default_rng(0))
    near = graph[3]
    kept = secagg.share(enc[3], 3, near, [enc[j].public_bytes for j in near], 4, 1)
    assert len(kept.reply) == secagg.KEY_BYTES + 6 * secagg.CIPHER_BYTES
    everyone = secagg.share(enc[3], 3, list(enc), [enc[j].public_bytes for j in enc], 20, 1)
    assert len(everyone.reply) == secagg.KEY_BYTES + 39 * secagg.CIPHER_BYTES


def test_a_device_that_never_shared_is_simply_not_in_the_round():
    codes = _codes(n=6)
    ids = sorted(codes)
    rnd = secagg.simulate_round(codes, 8, 2, drop_before_sharing=[ids[0]], drop_after_sharing=[ids[1]])
    assert rnd.k == secagg.ring_bits(5, 8) and rnd.t == 3
    np.testing.assert_array_equal(rnd.total, sum(codes[i] for i in ids[2:]))


def test_a_survivor_reveals_one_share_per_peer_never_both():
    ids, t, r = [2, 5, 9], 2, 7
    enc = {i: secagg.KeyPair.generate() for i in ids}
    keys = [enc[i].public_bytes for i in ids]
    kept = {i: secagg.share(enc[i], i, ids, keys, t, r) for i in ids}
    mask_keys, inbox = {}, {i: {} for i in ids}
    for i in ids:
        pub, cts = secagg.split_reply(kept[i].reply, 3)
        mask_keys[i] = pub
        for j, ct in zip([j for j in ids if j != i], cts):
            inbox[j][i] = ct
    got = secagg.reveal(enc[5], 5, kept[5], keys, mask_keys, [2, 5], inbox[5], r)  # 9 dropped
    x5 = ids.index(5)
    assert got[2] != kept[2].b and got[9] != kept[9].s  # shares, not the secrets
    assert got[5] == kept[5].own_b
    # the revealed shares of 2's b and of 9's s are real shares: with one more each, they rebuild
    assert secagg.combine({x5 + 1: got[2], 1: kept[2].own_b}, 2) == kept[2].b
    assert secagg.combine({x5 + 1: got[9], 3: kept[9].own_s}, 2) == kept[9].s
    with pytest.raises(SecAggError, match="not among the survivors"):
        secagg.reveal(enc[9], 9, kept[9], keys, mask_keys, [2, 5], inbox[9], r)
    with pytest.raises(SecAggError, match="refusing"):
        secagg.reveal(enc[5], 5, kept[5], keys, mask_keys, [5], inbox[5], r)
    # the server cannot read a ciphertext: a wrong key fails authentication
    with pytest.raises(Exception):
        secagg.reveal(secagg.KeyPair.generate(), 5, kept[5], keys, mask_keys, [2, 5], inbox[5], r)


def test_a_server_that_lists_a_wrong_key_for_a_device_is_refused():
    me, other = secagg.KeyPair.generate(), secagg.KeyPair.generate()
    with pytest.raises(SecAggError, match="not its own"):
        secagg.share(me, 1, [1, 2], [other.public_bytes, other.public_bytes], 1, 1)
    with pytest.raises(SecAggError, match="sorted unique"):
        secagg.share(me, 1, [2, 1], [other.public_bytes, me.public_bytes], 1, 1)


def test_a_single_masked_vector_looks_uniform_and_reveals_nothing():
    codes = {i: np.full(20000, 127, np.uint64) for i in range(3)}  # every update is zero
    ids = sorted(codes)
    enc = {i: secagg.KeyPair.generate() for i in ids}
    keys = [enc[i].public_bytes for i in ids]
    kept = {i: secagg.share(enc[i], i, ids, keys, 2, 1) for i in ids}
    mask_keys = {i: secagg.split_reply(kept[i].reply, 3)[0] for i in ids}
    k = secagg.ring_bits(3, 8)
    for i in ids:
        y = secagg.mask(codes[i], i, kept[i].b, kept[i].s, mask_keys, k, 1)
        counts = np.bincount((y >> np.uint64(k - 4)).astype(np.int64), minlength=16) / y.size
        assert np.abs(counts - 1 / 16).max() < 0.01  # uniform over Z_(2^k), though the input is constant


def test_the_two_ends_of_a_pair_derive_the_same_mask_and_nobody_else_does():
    a, b, server = secagg.KeyPair.generate(), secagg.KeyPair.generate(), secagg.KeyPair.generate()
    s_ab = secagg.pair_seed(a, b.public_bytes, 1, 2, round_idx=5)
    assert s_ab == secagg.pair_seed(b, a.public_bytes, 2, 1, round_idx=5)
    assert s_ab != secagg.pair_seed(a, b.public_bytes, 1, 2, round_idx=6)  # fresh masks every round
    assert secagg.pair_seed(server, a.public_bytes, 1, 2, 5) != s_ab
    assert secagg.KeyPair.from_seed(b"\1" * 16, 3).public_bytes == secagg.KeyPair.from_seed(b"\1" * 16, 3).public_bytes
    k = secagg.KeyPair.generate()
    assert secagg.KeyPair.from_private_bytes(k.private_bytes()).public_bytes == k.public_bytes


# ----------------------------------------------------------------------------- the server's part
class _Devices:
    """Stands in for the Grid and the ClientApps: answers SecureSum's share and unmask steps with
    fedkd.secagg's device side, as clients/client_app.py does, without Flower's engine."""

    def __init__(self, nodes):
        from types import SimpleNamespace

        self.ns = SimpleNamespace
        self.enc = {n.partition_id: secagg.KeyPair.generate() for n in nodes}
        self.kept, self.holders, self.mask_keys, self.rejections = {}, None, None, []

    def key(self, pid):
        return self.enc[pid].public_bytes

    def near(self, pid):
        """The mask keys a device uses: those of the holders it shared with (as the ClientApp does)."""
        return {j: key for j, key in self.mask_keys.items() if j in self.kept[pid].ids}

    def exchange(self, grid, items, kind, r):
        from server.transport import Exchanged
        from wire import Content, pack

        replies = []
        for node, content in items:
            pid, peers = node.partition_id, content.configs["peers"]
            if kind == "query.secagg_keys":
                ids = list(peers["ids"])
                keys = [peers["keys"][i * 32:(i + 1) * 32] for i in range(len(ids))]
                cfg = content.configs["config"]
                self.kept[pid] = secagg.share(self.enc[pid], pid, ids, keys, cfg.get("share-threshold", cfg["threshold"]), r)
                out = {"shares": self.kept[pid].reply}
            else:
                ids = self.kept[pid].ids
                cts = {j: peers["shares"][x * 48:(x + 1) * 48] for x, j in enumerate(peers["from"])}
                near = self.near(pid)
                got = secagg.reveal(self.enc[pid], pid, self.kept[pid], [self.key(i) for i in ids], near,
                                    peers["survivors"], cts, r)
                out = {"shares": b"".join(got[j] for j in sorted(near))}
            replies.append((node, self.ns(content=pack(Content(configs={"secagg": out})))))
        return Exchanged(replies, 10 * len(items), 20 * len(replies), {})


def _secure_sum(n=6, threshold=0.5, weighted=True, shares=0, group_size=0):
    from fedkd.models import ModelConfig
    from server.aggregation import SecureSum
    from server.transport import Node
    from wire import Content

    full = ModelConfig(kind="meanpool", num_items=20, dim=4, max_len=5)
    nodes = [Node(node_id=100 + i, partition_id=i, tier=0, examples=10 * (i + 1)) for i in range(n)]
    devices = _Devices(nodes)
    nodes = [Node(n.node_id, n.partition_id, n.tier, n.examples, devices.key(n.partition_id)) for n in nodes]
    agg = SecureSum(full, 4, devices, quant_bits=8, threshold=threshold, initial_range=1.0, adaptive=True,
                    weighted=weighted, shares=shares, group_size=group_size)
    content = Content(configs={"config": {"round": 3}})
    sent, _ = agg.before_train(None, nodes, [content], 3)
    devices.mask_keys = dict(zip(content.configs["peers"]["ids"],
                                 [content.configs["peers"]["keys"][i * 32:(i + 1) * 32] for i in range(len(sent))]))
    return agg, devices, sent, content


def _uploads(agg, devices, content, survivors, examples):
    from server.replies import Upload

    rng = np.random.default_rng(0)
    cfg = content.configs["config"]
    out, plain = [], {}
    for node in survivors:
        pid = node.partition_id
        u = {k: rng.normal(0, 0.1, s) * examples[pid] / cfg["secagg-examples"] for k, s in agg.layout.items()}
        codes = secagg.quantize(u, agg.layout, np.array(cfg["secagg-ranges"]), 8, np.random.default_rng(pid),
                                stats=True)
        plain[pid] = codes
        kept = devices.kept[pid]
        # the ClientApp's ring: the round's holders, or with groups its group's (those it shared with)
        k = secagg.ring_bits(len(devices.near(pid)), 8) if agg.group_size else agg.ring_bits
        y = secagg.mask(codes, pid, kept.b, kept.s, devices.near(pid), k, 3)
        out.append(Upload(node, {"num-examples": examples[pid]}, secagg.pack_ring(y, k)))
    return out, plain


def test_the_server_recovers_the_weighted_mean_of_the_survivors_and_refuses_below_the_threshold():
    agg, devices, sent, content = _secure_sum()
    assert len(sent) == 6 and agg.t == 3 and content.configs["config"]["secagg-examples"] == 35.0
    examples = {n.partition_id: 5 * (n.partition_id + 1) for n in sent}
    uploads, plain = _uploads(agg, devices, content, sent[2:], examples)  # two dropped after sharing
    assert all(u.payload.size == agg.expected_bytes() for u in uploads)
    got = agg(uploads, 3)
    assert got.used == 4 and got.nbytes == (40, 80)
    sums, _ = secagg.dequantize_sum(sum(plain.values()), 4, agg.layout, np.ones(len(agg.layout)), 8, stats=True)
    weight = sum(examples[u.node.partition_id] for u in uploads) / 35.0
    for k in agg.layout:
        np.testing.assert_allclose(got.update[k], (sums[k] / weight).astype(np.float32))
    # below the threshold: refused, logged, nothing goes into the model
    agg, devices, sent, content = _secure_sum()
    uploads, _ = _uploads(agg, devices, content, sent[:2], examples)
    got = agg(uploads, 3)
    assert got.update is None and got.used == 0
    assert "refused the round: only 2 of the 6 devices" in devices.rejections[-1]["reason"]


def test_the_server_runs_secaggplus_neighbourhoods_and_pays_per_neighbour():
    """SecureSum with secagg-shares 5 among 12 devices: each is asked to share with its 5, the
    survivors' weighted mean comes back exactly as with the complete graph, and the key step's
    bytes up are a device's 4 ciphertexts, not 11 (the fake transport counts 20 bytes a reply, so
    the real bytes are checked on the replies themselves)."""
    examples = {i: 5 * (i + 1) for i in range(12)}
    means = {}
    for shares in (0, 5):
        agg, devices, sent, content = _secure_sum(n=12, shares=shares)
        assert agg.share_t == (3 if shares else 6) and agg.t == 6
        assert {len(agg.graph[n.partition_id]) for n in sent} == {5 if shares else 12}
        assert {len(devices.kept[n.partition_id].reply) for n in sent} == \
            {secagg.KEY_BYTES + (4 if shares else 11) * secagg.CIPHER_BYTES}
        uploads, plain = _uploads(agg, devices, content, sent[1:], examples)  # one dropped after sharing
        got = agg(uploads, 3)
        assert got.used == 11
        means[shares] = got.update
    for k in means[0]:  # the same survivors, the same grid: the same mean (rounding draws are per device)
        np.testing.assert_array_equal(means[0][k], means[5][k])


def test_the_refusal_bound_is_exact_for_the_complete_graph_and_covers_what_neighbourhoods_lose():
    # complete graph: refused when fewer than t = 5 of 10 survive, i.e. 6 or more drop
    exact = sum(math.comb(10, a) * 0.7 ** a * 0.3 ** (10 - a) for a in range(5))
    assert secagg.refusal_chance(10, 0, 0.5, 0.3) == pytest.approx(exact)
    assert secagg.refusal_chance(10, 11, 0.5, 0.3) == pytest.approx(exact)
    # neighbourhoods: larger ones fail less, and the bound holds over many drawn rounds
    bounds = [secagg.refusal_chance(30, k, 0.5, 0.2) for k in (5, 9, 15)]
    assert bounds[0] > bounds[1] > bounds[2]
    rng = np.random.default_rng(0)
    ids = list(range(30))
    refused = 0
    for _ in range(2000):
        graph = secagg.neighbourhoods(ids, 9, rng)
        alive = {i for i in ids if rng.random() >= 0.2}
        refused += len(alive) < 15 or any(sum(j in alive for j in graph[i]) < 5 for i in ids)
    assert 0 < refused / 2000 <= bounds[1]


def test_groups_cut_the_round_into_near_equal_groups_of_at_most_the_size_and_at_least_two():
    for n, size in ((150, 16), (12, 4), (17, 16), (3, 2), (2, 16), (40, 7)):
        graph = secagg.groups(range(n), size, np.random.default_rng(n))
        parts = {tuple(g) for g in graph.values()}
        sizes = sorted(len(g) for g in parts)
        assert sorted(i for g in parts for i in g) == list(range(n))  # every device in exactly one group
        assert all(graph[i] == sorted(graph[i]) and i in graph[i] for i in range(n))
        assert sizes[-1] - sizes[0] <= 1 and sizes[0] >= 2
        assert sizes[-1] <= size or len(parts) == 1  # a round too small for two groups stays whole
    assert {len(g) for g in secagg.groups(range(150), 16, np.random.default_rng(0)).values()} == {15}
    assert secagg.groups(range(3), 2, np.random.default_rng(0)) == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}
    a, b = (secagg.groups(range(30), 5, np.random.default_rng(s)) for s in (1, 2))
    assert a == secagg.groups(range(30), 5, np.random.default_rng(1)) and a != b  # drawn by the server each round
    # a group's ring holds its own devices' codes only: 12 bits for 15 at 8 bits, 16 for 150
    assert secagg.ring_bits(15, 8) == 12 and secagg.ring_bits(150, 8) == 16


def test_the_server_sums_groups_exactly_and_refuses_a_group_alone():
    """SecureSum with groups of at most 4 among 12 devices: each device shares with its group only
    (its threshold), uploads in its group's 10-bit ring instead of the round's 12, and the
    survivors' mean is the complete graph's, bit for bit; a group that loses 3 of its 4 devices
    after sharing is refused alone (its last device too), and the mean is the other groups'."""
    examples = {i: 5 * (i + 1) for i in range(12)}
    means, sizes = {}, {}
    for group in (0, 4):
        agg, devices, sent, content = _secure_sum(n=12, group_size=group)
        assert {len(devices.kept[n.partition_id].ids) for n in sent} == {4 if group else 12}
        assert {devices.kept[n.partition_id].t for n in sent} == {2 if group else 6}
        uploads, plain = _uploads(agg, devices, content, sent[1:], examples)  # one dropped after sharing
        sizes[group] = {u.payload.size for u in uploads}
        assert all(u.payload.size == agg.expected_bytes(u.node.partition_id) for u in uploads)
        got = agg(uploads, 3)
        assert got.used == 11 and not devices.rejections
        means[group] = got.update
        assert len(agg.last_groups) == (3 if group else 0)
    assert sizes == {0: {secagg.packed_ring_bytes(agg.length, 12)}, 4: {secagg.packed_ring_bytes(agg.length, 10)}}
    for k in means[0]:
        np.testing.assert_array_equal(means[0][k], means[4][k])
    agg, devices, sent, content = _secure_sum(n=12, group_size=4)
    lost = agg.graph[0][1:]  # three of device 0's group
    alive = [n for n in sent if n.partition_id not in lost]
    uploads, plain = _uploads(agg, devices, content, alive, examples)
    got = agg(uploads, 3)
    assert got.used == 8 and len(agg.last_groups) == 2  # device 0, alone in its group, is left out too
    assert f"refused the group {agg.graph[0]}: only 1 of its 4 devices" in devices.rejections[-1]["reason"]
    kept = [u for u in uploads if u.node.partition_id != 0]
    sums, _ = secagg.dequantize_sum(sum(plain[u.node.partition_id] for u in kept), 8, agg.layout,
                                    np.ones(len(agg.layout)), 8, stats=True)
    weight = sum(examples[u.node.partition_id] for u in kept) / content.configs["config"]["secagg-examples"]
    for k in agg.layout:
        np.testing.assert_allclose(got.update[k], (sums[k] / weight).astype(np.float32))


def test_the_refusal_bound_with_groups_is_per_group():
    def fewer(m, t, d):
        return sum(__import__("math").comb(m, a) * (1 - d) ** a * d ** (m - a) for a in range(t))
    assert secagg.refusal_chance(150, 0, 0.5, 0.3, group=16) == pytest.approx(10 * fewer(15, 8, 0.3))
    assert secagg.refusal_chance(150, 0, 0.5, 0.3, group=16) > secagg.refusal_chance(150, 0, 0.5, 0.3)


@pytest.mark.parametrize("overrides, says", [
    ({"secagg-group-size": 1}, r"allowed 0 \(one secure sum over the round\) or at least 2"),
    ({"secagg-group-size": 16, "secagg-shares": 5}, "0 with secagg-shares"),
    ({"secagg-group-size": 16, "dp-mode": "distributed"}, "0 with dp-mode = distributed"),
])
def test_groups_refuse_what_they_cannot_keep(overrides, says):
    from fedkd.config import ExperimentConfig

    with pytest.raises(ValueError, match=says):
        ExperimentConfig.from_flat({"secure-aggregation": True, **overrides})
