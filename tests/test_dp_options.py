"""Two options of differential privacy: noise from the OS's CSPRNG (dp-secure-rng) and adaptive
clipping (dp-clip-adaptive, Andrew et al. 2021), checked against Flower's own formulas."""

import math

import numpy as np
import pytest
from scipy import stats

from fedkd.config import ExperimentConfig
from fedkd.privacy import PrivacyAccountant, QuantileClip, SecureGenerator, adaptive_noise_split, dp_rng, local_dp
from fedkd.streams import Stream
from server.aggregation import CentralDP, ClippedSum
from server.replies import Upload
from server.transport import Node

# ----------------------------------------------------------------------------- dp-secure-rng


def test_secure_normal_has_the_requested_mean_variance_and_shape():
    g = SecureGenerator()
    x = g.normal(1.5, 2.0, size=(400, 501))  # odd count: Box-Muller's pairs are cut to size
    assert x.shape == (400, 501)
    n = x.size
    assert abs(x.mean() - 1.5) < 5 * 2.0 / math.sqrt(n)  # 5 standard errors
    assert x.var() == pytest.approx(4.0, rel=5 * math.sqrt(2 / n))
    z = (x.ravel() - 1.5) / 2.0
    assert stats.kstest(z, "norm").pvalue > 1e-4  # the shape too, not only two moments
    assert abs(np.mean(np.abs(z) > 1.959964) - 0.05) < 0.003
    assert isinstance(g.normal(0.0, 1.0), float)


def test_secure_uniform_draws_fill_the_unit_interval():
    u = SecureGenerator().random(200_000)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.size)
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_seeded_streams_repeat_and_the_secure_generator_never_does():
    a, b = (dp_rng(False, 3, Stream.CENTRAL_DP_NOISE, 2).normal(0, 1, 1000) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    c, d = (dp_rng(True, 3, Stream.CENTRAL_DP_NOISE, 2).normal(0, 1, 1000) for _ in range(2))
    assert isinstance(dp_rng(True, 3, Stream.CENTRAL_DP_NOISE, 2), SecureGenerator)
    assert not np.array_equal(c, d) and not np.array_equal(a, c)


def _upload(pid: int, payload: dict) -> Upload:
    return Upload(Node(node_id=pid, partition_id=pid, tier=0, examples=1), {"num-examples": 1}, payload)


def _central(clip=1.0, z=0.5, secure=False, adaptive=None, update_noise=None, eligible=50, rate=0.2):
    acc = PrivacyAccountant(mode="central", noise_multiplier=z, rate=rate, delta=1e-5)
    template = {"w": np.zeros((100, 50), np.float32)}
    inner = ClippedSum(None, {p: 50 for p in range(eligible)}, 50, clip)
    return CentralDP(inner, acc, clip=clip, eligible=eligible, seed=0, template=template, secure_rng=secure,
                     adaptive=adaptive, update_noise=update_noise)


def test_two_runs_with_a_secure_rng_release_different_noise_of_the_right_size():
    ups = [_upload(p, {"w": np.full((100, 50), 0.001, np.float32)}) for p in range(10)]
    seeded = [_central()(ups, r=1).update["w"] for _ in range(2)]
    np.testing.assert_array_equal(*seeded)  # the default: a run repeats
    secure = [_central(secure=True)(ups, r=1).update["w"] for _ in range(2)]
    assert not np.array_equal(*secure)
    mean = 10 * 0.001 / (0.2 * 50)  # the clipped sum over the expected participants
    for got in secure:  # std z C / (q n) = 0.5 / 10
        assert abs(got.mean() - mean) < 5 * 0.05 / math.sqrt(got.size)
        assert got.std() == pytest.approx(0.05, rel=0.03)


def test_local_dp_with_a_secure_rng_noises_each_update_afresh():
    cfg = ExperimentConfig(dp_mode="local", dp_noise_multiplier=2.0, dp_clip_norm=0.5, dp_secure_rng=True)
    update = {"a": np.zeros(100_000, np.float32)}
    runs = [local_dp(update, cfg, dp_rng(True, cfg.seed, Stream.LOCAL_DP_NOISE, 1, 4))["a"] for _ in range(2)]
    assert not np.array_equal(*runs)
    for noise in runs:
        assert noise.std() == pytest.approx(1.0, rel=0.02) and abs(noise.mean()) < 5 / math.sqrt(noise.size)


def test_secure_rng_needs_dp():
    with pytest.raises(ValueError, match="'dp-secure-rng'.*dp-mode = off"):
        ExperimentConfig(dp_secure_rng=True)

# ----------------------------------------------------------------------------- adaptive clipping


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("start", [0.05, 50.0])
def test_the_clip_converges_to_the_target_quantile_of_synthetic_norms(quantile, start):
    """Lognormal norms (median 2), 100 expected clients a round, Poisson-sampled, the paper's
    default count noise (100 / 20): from far below and far above, the clip settles at the
    quantile, and the share of unclipped norms at the target."""
    rng = np.random.default_rng(0)
    expected = 100
    clip = QuantileClip(clip=start, quantile=quantile, lr=0.2, count_stddev=expected / 20, expected=expected)
    history = []
    for r in range(400):
        norms = rng.lognormal(math.log(2.0), 0.5, size=rng.poisson(expected))
        clip.update(norms, rng)
        history.append(clip.clip)
    truth = 2.0 * math.exp(0.5 * stats.norm.ppf(quantile))  # the lognormal's quantile
    settled = np.mean(history[-100:])
    assert settled == pytest.approx(truth, rel=0.06)
    share = np.mean(rng.lognormal(math.log(2.0), 0.5, size=200_000) <= settled)
    assert abs(share - quantile) < 0.03


def test_flowers_server_side_wrapper_moves_the_clip_away_from_its_target():
    """What docs/privacy.md says of Flower 1.41's DifferentialPrivacyServerSideAdaptiveClipping:
    it counts clipped updates but steps the clip with the paper's sign (meant for unclipped
    ones), so with no noise and every update clipped the clip shrinks, and keeps shrinking."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), noise_multiplier=0.0, num_sampled_clients=100,
                                                           initial_clipping_norm=1.0, target_clipped_quantile=0.5)
    norms = np.random.default_rng(0).lognormal(math.log(2.0), 0.5, size=100)  # median 2: most clipped at 1
    for _ in range(50):
        clipped = int(np.sum(norms > flower.clipping_norm))
        flower._geometric_update(flower._noisy_fraction(clipped, len(norms)))
    assert flower.clipping_norm < 0.01  # driven towards 0; the median is 2
    ours = QuantileClip(clip=1.0, quantile=0.5, lr=0.2, count_stddev=0.0, expected=100)
    for _ in range(50):
        ours.update(norms, None)
    assert ours.clip == pytest.approx(np.median(norms), rel=0.1)


def test_the_noise_split_is_flowers_and_costs_what_one_release_at_z_costs():
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params
    for z, m, sb in [(1.0, 100, 0.0), (0.7, 40, 0.0), (1.3, 60, 5.0), (0.0, 40, 0.0)]:
        ours = adaptive_noise_split(z, m, sb)
        theirs = compute_adaptive_noise_params(z, m, sb or None)
        assert ours == pytest.approx(theirs)
        sigma_b, z_update = ours
        if z > 0:  # Gaussian composition: sum (sensitivity C, std z_u C) and count (1/2, sigma_b) = one at z
            assert z_update ** -2 + (0.5 / sigma_b) ** 2 == pytest.approx(z ** -2)
            assert z_update > z
    with pytest.raises(ValueError, match="dp-clip-count-stddev"):
        adaptive_noise_split(2.0, 20)  # sigma_b = 1 = z / 2: the count alone would spend the whole budget


def test_adaptive_central_dp_clips_at_the_moving_norm_and_checkpoints_it():
    expected = 0.2 * 50
    sigma_b, z_u = adaptive_noise_split(0.5, expected, 0.0)
    clipper = QuantileClip(clip=1.0, quantile=0.5, lr=0.2, count_stddev=sigma_b, expected=expected)
    agg = _central(clip=1.0, z=0.5, adaptive=clipper, update_noise=z_u)
    ups = [_upload(p, {"w": np.full((100, 50), 0.1 * (p + 1), np.float32)}) for p in range(10)]  # norms 7.1 .. 71
    first = agg(ups, r=1)
    assert first.clip == 1.0 and first.columns["dp_clip_norm"] == 1.0 and first.released
    assert clipper.clip > 1.0  # every update was clipped: the norm grows
    noise = first.update["w"] - 10 * 1.0 / (50 * 100) ** 0.5 / expected  # each clipped to norm 1, spread evenly
    assert noise.std() == pytest.approx(z_u * 1.0 / expected, rel=0.05)
    second = agg(ups, r=2)
    assert second.clip == pytest.approx(1.0 * math.exp(-0.2 * (first.columns["dp_unclipped_share"] - 0.5)))
    state = agg.state_dict()
    again = _central(clip=1.0, z=0.5, adaptive=QuantileClip(1.0, 0.5, 0.2, sigma_b, expected), update_noise=z_u)
    again.load_state_dict(state)
    assert again.adaptive.clip == clipper.clip
    np.testing.assert_array_equal(again(ups, r=3).update["w"], agg(ups, r=3).update["w"])  # same round, same draws


def test_adaptive_clipping_settings_are_validated():
    with pytest.raises(ValueError, match="'dp-clip-adaptive'.*central"):
        ExperimentConfig(dp_mode="local", dp_clip_adaptive=True)
    with pytest.raises(ValueError, match="'dp-clip-adaptive'.*secure-aggregation"):
        ExperimentConfig(dp_mode="central", secure_aggregation=True, dp_clip_adaptive=True)
    with pytest.raises(ValueError, match="'dp-clip-quantile'"):
        ExperimentConfig(dp_clip_quantile=1.0)
    with pytest.raises(ValueError, match="'dp-clip-lr'"):
        ExperimentConfig(dp_clip_lr=0.0)
    ExperimentConfig(dp_mode="central", dp_clip_adaptive=True, dp_clip_quantile=0.7)
