"""Random streams: every draw's key is named in fedkd.streams, no two streams share a key, and
DP noise draws from streams of its own (before, central DP noise equalled device jitter)."""

import ast
from pathlib import Path

import numpy as np

from fedkd import streams
from fedkd.streams import Stream

ROOT = Path(__file__).resolve().parents[1]


def test_every_stream_has_its_own_tag():
    tags = [int(s) for s in Stream]
    assert len(tags) == len(set(tags))


def test_no_two_streams_coincide_on_the_same_ids():
    """The same ids under two streams give different numbers, for every pair of streams."""
    ids = (0, 3, 5)
    draws = {s: streams.rng(7, s, *ids).random(4).tobytes() for s in Stream}
    assert len(set(draws.values())) == len(draws)


def test_dp_noise_no_longer_equals_device_jitter_or_availability():
    # the collisions the old magic numbers made: [seed, 11, r] vs [seed, 11, pid]; [seed, 12, r, pid]
    assert not np.array_equal(streams.rng(0, Stream.CENTRAL_DP_NOISE, 4).random(8),
                              streams.rng(0, Stream.DEVICE_JITTER, 4).random(8))
    assert not np.array_equal(streams.rng(0, Stream.LOCAL_DP_NOISE, 2, 9).random(8),
                              streams.rng(0, Stream.AVAILABILITY, 2, 9).random(8))


def test_same_key_same_numbers_and_torch_seed_is_31_bits():
    assert np.array_equal(streams.rng(1, Stream.SELECTION, 3).random(5), streams.rng(1, Stream.SELECTION, 3).random(5))
    s = streams.torch_seed(1, Stream.LOCAL_DROPOUT, 3, 4)
    assert 0 <= s < 2**31 and s == hash((1, 7, 3, 4)) % 2**31  # the seed the client used before the module


def test_no_seeded_draw_outside_the_streams_module():
    """Library and app code seed generators only through fedkd.streams (a literal tag elsewhere
    is how two streams collided before)."""
    offenders = []
    for folder in ("fedkd", "server", "clients"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "streams.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "default_rng"
                        and node.args and isinstance(node.args[0], ast.List)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
