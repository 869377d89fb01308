"""The whole-state wire codec: identity at 32 bits, bounded error, refusals with reasons."""

import numpy as np
import pytest

from fedkd.codec import PayloadError, decode_state, encode_state, layout_of


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"emb": rng.normal(size=(50, 8)).astype(np.float32),
            "bias": rng.normal(size=(8,)).astype(np.float32),
            "scalar": np.array(0.5, np.float32)}


def test_32_bits_is_the_identity_bit_for_bit():
    s = _state()
    out = decode_state(encode_state(s, bits=32, stochastic=True), layout_of(s), bits=32)
    for k in s:
        assert out[k].tobytes() == s[k].tobytes()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nearest_rounding_error_is_at_most_half_a_step(bits):
    s = _state()
    enc = encode_state(s, bits=bits, stochastic=False)
    out = decode_state(enc, layout_of(s), bits=bits)
    for i, k in enumerate(s):
        assert np.abs(out[k] - s[k]).max() <= enc["scale"][i] / 2 + 1e-6


def test_8_bit_payload_is_a_quarter_of_float32_plus_two_floats_per_tensor():
    s = _state()
    n = sum(v.size for v in s.values())
    enc = encode_state(s, bits=8, stochastic=False)
    assert sum(a.nbytes for a in enc.values()) == n + 2 * 4 * len(s)


@pytest.mark.parametrize("mutate, reason", [
    (lambda e: e.pop("scale"), "wrong keys"),
    (lambda e: e.update(codes=e["codes"][:-1]), "'codes' has shape"),
    (lambda e: e.update(codes=e["codes"].astype(np.int16)), "'codes' has dtype int16"),
    (lambda e: e.update(scale=np.full_like(e["scale"], np.nan)), "non-finite"),
    (lambda e: e.update(extra=np.zeros(1)), "unexpected ['extra']"),
])
def test_malformed_payloads_are_refused_with_a_reason(mutate, reason):
    s = _state()
    enc = encode_state(s, bits=8, stochastic=False)
    mutate(enc)
    with pytest.raises(PayloadError, match=__import__("re").escape(reason)):
        decode_state(enc, layout_of(s), bits=8)


def test_non_finite_float32_values_are_refused():
    s = _state()
    enc = encode_state(s, bits=32, stochastic=False)
    enc["values"][3] = np.inf
    with pytest.raises(PayloadError, match="non-finite"):
        decode_state(enc, layout_of(s), bits=32)


@pytest.mark.parametrize("num_items", [1, 255, 1682, 70_000])
def test_packed_ids_round_trip_exactly_and_use_id_bits_each(num_items):
    from fedkd.codec import id_bits, pack_ids, unpack_ids
    ids = np.random.default_rng(0).integers(0, num_items + 1, size=(7, 13))
    ids[0, 0], ids[-1, -1] = 0, num_items
    packed = pack_ids(ids, num_items)
    assert packed.size == -(-ids.size * id_bits(num_items) // 8)
    assert np.array_equal(unpack_ids(packed, ids.shape, num_items), ids)
    with pytest.raises(PayloadError):
        unpack_ids(packed[:-1], ids.shape, num_items)
