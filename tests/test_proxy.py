"""The proxy payload of a train message round-trips through its wire form."""

import numpy as np
import pytest

from fedkd.models import ModelConfig, build_model
from fedkd.proxy import decode_proxy, encode_proxy, soft_labels


@pytest.mark.parametrize("bits", [8, 32])
def test_proxy_payload_round_trip(bits):
    n_items, rows, k, L = 1682, 6, 5, 4
    rng = np.random.default_rng(0)
    hist = rng.integers(0, n_items + 1, size=(rows, L))
    teacher = build_model(ModelConfig(num_items=n_items, dim=8, max_len=L), seed=1)
    sl = soft_labels(teacher, hist, temperature=2.0, top_k=k)
    arrays = encode_proxy(hist, sl, num_items=n_items, bits=bits)
    assert "probs.shape" not in {k_[3:] for k_ in arrays}  # implied by the config, not sent
    back = decode_proxy(arrays, rows=rows, top_k=k, max_len=L, num_items=n_items, bits=bits)
    assert np.array_equal(back.histories, hist) and np.array_equal(back.ids, sl.ids)
    tol = 0 if bits == 32 else sl.probs.max() / 255
    assert np.abs(back.probs - sl.probs).max() <= tol + 1e-7
