"""Client-level DP: the accountant against independent computations, clipping, noise, budget."""

import json
import math

import numpy as np
import pytest

from fedkd.config import ExperimentConfig
from fedkd.privacy import (PrivacyAccountant, accountant_for, add_gaussian_noise, calibrate_noise, clip_update,
                           epsilon_for, l2_norm, local_dp, local_releases, noisy_mean, poisson_sample, private_sum,
                           resolve_noise, sampling_rate)

# (noise multiplier, sampling rate, rounds, delta): the MovieLens setting (150 of 754 clients,
# 20 rounds) at the noise that gives epsilon ~ 8, 4 and 1, a full-participation one and a
# long low-rate one.
CASES = [(1.0, 150 / 754, 20, 1e-5), (1.4, 150 / 754, 20, 1e-5), (3.0, 150 / 754, 20, 1e-5),
         (0.8, 1.0, 10, 1e-5), (1.3, 0.01, 1000, 1e-6)]


def _agree_to_3_significant_digits(a: float, b: float) -> bool:
    """|a - b| within half a unit of the third significant digit of b."""
    return abs(a - b) <= 0.5 * 10 ** (math.floor(math.log10(abs(b))) - 2)


def _dp_accounting_epsilon(z, q, rounds, delta, orders=None):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    acc = rdp.RdpAccountant(orders=orders)
    event = dp_event.GaussianDpEvent(z)
    acc.compose(event if q >= 1 else dp_event.PoissonSampledDpEvent(q, event), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z,q,rounds,delta", CASES)
def test_epsilon_equals_google_dp_accounting_to_three_significant_digits(z, q, rounds, delta):
    """Acceptance 2: fedkd's accountant (Opacus' RDP analysis) against Google's dp-accounting
    (the library Flower's RdpAccountant wraps), each with its own default orders."""
    ours = epsilon_for(z, q, rounds, delta)
    theirs = _dp_accounting_epsilon(z, q, rounds, delta)
    assert _agree_to_3_significant_digits(ours, theirs), (ours, theirs)
    assert ours <= theirs * (1 + 1e-9)  # dp-accounting 0.6 is the conservative one at fractional orders


def test_on_integer_orders_both_libraries_agree_exactly():
    """On integer orders both use the closed form of the sampled Gaussian's RDP: equal to 1e-9."""
    from opacus.accountants.analysis import rdp

    z, q, rounds, delta = 1.0, 150 / 754, 20, 1e-5
    orders = list(range(2, 65))
    ours, _ = rdp.get_privacy_spent(orders=orders, rdp=rdp.compute_rdp(q=q, noise_multiplier=z, steps=rounds,
                                                                         orders=orders), delta=delta)
    assert ours == pytest.approx(_dp_accounting_epsilon(z, q, rounds, delta, orders=orders), rel=1e-9)


def _rdp_by_integration(q: float, z: float, alpha: float) -> float:
    """RDP of one Poisson-sampled Gaussian release at any order alpha, from its definition
    (Mironov, Talwar, Zhang 2019): log E_{x~N(0,z^2)}[((1-q) + q exp((2x-1)/(2z^2)))^alpha] / (alpha-1),
    by numerical integration."""
    import mpmath as mp

    mp.mp.dps = 30
    f = lambda x: mp.npdf(x, 0, z) * ((1 - q) + q * mp.e ** ((2 * x - 1) / (2 * z * z))) ** alpha  # noqa: E731
    return float(mp.log(mp.quad(f, [-mp.inf, 0, mp.inf])) / (alpha - 1))


@pytest.mark.parametrize("alpha", [2, 3.2, 7.5, 20])
def test_rdp_at_fractional_and_integer_orders_equals_numerical_integration(alpha):
    """What the accountant sums per round, against the definition computed from scratch."""
    from opacus.accountants.analysis import rdp

    q, z = 150 / 754, 1.0
    assert rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=[alpha])[0] == pytest.approx(
        _rdp_by_integration(q, z, alpha), rel=1e-6)


def test_no_noise_is_infinite_epsilon_and_no_rounds_is_zero():
    assert epsilon_for(0.0, 0.2, 10, 1e-5) == math.inf
    assert epsilon_for(1.0, 0.2, 0, 1e-5) == 0.0


def test_epsilon_grows_with_rounds_and_rate_and_falls_with_noise():
    e = epsilon_for(1.0, 0.2, 20, 1e-5)
    assert epsilon_for(1.0, 0.2, 40, 1e-5) > e
    assert epsilon_for(1.0, 0.4, 20, 1e-5) > e
    assert epsilon_for(2.0, 0.2, 20, 1e-5) < e


@pytest.mark.parametrize("target", [8.0, 4.0, 2.0, 1.0])
def test_calibrated_noise_reaches_the_target_and_no_less_noise_would(target):
    q, rounds, delta = 150 / 754, 20, 1e-5
    z = calibrate_noise(target, q, rounds, delta)
    assert epsilon_for(z, q, rounds, delta) <= target
    assert epsilon_for(z * 0.99, q, rounds, delta) > target


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    u = {"a": np.array([3.0, 4.0], np.float32), "b": np.zeros((2, 2), np.float32)}
    clipped, norm = clip_update(u, 1.0)
    assert norm == pytest.approx(5.0)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)
    same, _ = clip_update(u, 10.0)
    np.testing.assert_array_equal(same["a"], u["a"])
    zero, n0 = clip_update({"a": np.zeros(3, np.float32)}, 1.0)
    assert n0 == 0 and not zero["a"].any()


def test_gaussian_noise_has_the_requested_std_and_repeats_with_the_seed():
    u = {"a": np.zeros(200_000, np.float32)}
    x = add_gaussian_noise(u, 0.5, np.random.default_rng(1))["a"]
    assert x.std() == pytest.approx(0.5, rel=0.01) and abs(x.mean()) < 0.01
    np.testing.assert_array_equal(x, add_gaussian_noise(u, 0.5, np.random.default_rng(1))["a"])


def test_zero_noise_and_a_huge_clip_equal_the_plain_mean():
    """The degenerate setting equals its baseline (as Opacus tests it)."""
    rng = np.random.default_rng(0)
    ups = [{"w": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(5)]
    total, norms = private_sum(ups, clip_norm=1e9)
    mean = noisy_mean(total, std=0.0, denominator=5, rng=rng, template=ups[0])
    np.testing.assert_allclose(mean["w"], np.mean([u["w"] for u in ups], axis=0), rtol=1e-6, atol=1e-7)
    assert len(norms) == 5


def test_an_empty_round_still_releases_noise_of_the_right_shape():
    out = noisy_mean({}, std=1.0, denominator=10, rng=np.random.default_rng(0),
                     template={"w": np.zeros((50, 40), np.float32)})
    assert out["w"].shape == (50, 40) and out["w"].std() == pytest.approx(0.1, rel=0.05)


def test_poisson_sampling_rate_and_determinism():
    picks = [len(poisson_sample(range(1000), 0.2, np.random.default_rng(s))) for s in range(20)]
    assert np.mean(picks) == pytest.approx(200, rel=0.05)
    assert poisson_sample(range(50), 0.3, np.random.default_rng(7)) == poisson_sample(range(50), 0.3,
                                                                                      np.random.default_rng(7))
    assert sampling_rate(0, 40) == 1.0 and sampling_rate(10, 40) == 0.25 and sampling_rate(50, 40) == 1.0


def test_central_accountant_budget_state_round_trip():
    acc = PrivacyAccountant(mode="central", noise_multiplier=1.0, rate=0.2, delta=1e-5, target_epsilon=3.0)
    rounds = 0
    while not acc.would_exceed()[0]:
        acc.record()
        rounds += 1
    assert epsilon_for(1.0, 0.2, rounds, 1e-5) <= 3.0 < epsilon_for(1.0, 0.2, rounds + 1, 1e-5)
    back = PrivacyAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert back == acc and back.epsilon() == acc.epsilon()
    assert acc.report()["releases"] == rounds


def test_local_accountant_counts_the_most_exposed_client():
    acc = PrivacyAccountant(mode="local", noise_multiplier=2.0, rate=1.0, delta=1e-5, target_epsilon=5.0)
    acc.record([1, 2])
    acc.record([2])
    assert acc.releases == 2
    assert acc.epsilon() == epsilon_for(2.0, 1.0, 2, 1e-5)  # no amplification: the server sees who sent
    assert PrivacyAccountant.from_dict(json.loads(json.dumps(acc.to_dict()))) == acc
    while not acc.exhausted(2):
        acc.record([2])
    assert not acc.exhausted(1) and acc.exhausted(2)


def test_local_dp_capped_participations_calibrate_for_the_cap_and_sit_the_device_out():
    """dp-local-participations = K: the noise is priced for K noisy updates (less noise than for
    every round), and a device that has sent K sits out even where the target is not reached."""
    base = ExperimentConfig(dp_mode="local", dp_target_epsilon=8.0, clients_per_round=150, num_rounds=120)
    capped = base.replace(dp_local_participations=36)
    every, acc = accountant_for(base, num_clients=754), accountant_for(capped, num_clients=754)
    assert local_releases(base) == 120 and local_releases(capped) == 36 and every.cap == 0
    assert acc.cap == 36 and acc.noise_multiplier < 0.6 * every.noise_multiplier
    assert acc.epsilon(36) <= 8.0 < acc.epsilon(37)
    z = resolve_noise("local", 0.0, 8.0, 1.0, 36, 1e-5)
    assert z == acc.noise_multiplier  # what the device calibrates from the config alone
    fixed = accountant_for(capped.replace(dp_target_epsilon=0.0, dp_noise_multiplier=3.0), 754)
    for _ in range(36):
        assert not fixed.exhausted(5)
        fixed.record([5])
    assert fixed.exhausted(5) and not fixed.exhausted(6)  # no target, yet the cap holds
    assert PrivacyAccountant.from_dict(json.loads(json.dumps(fixed.to_dict()))) == fixed
    assert "cap" not in every.to_dict()  # uncapped state files are as before
    with pytest.raises(ValueError, match="dp-local-participations.*0 with dp-mode = central"):
        base.replace(dp_mode="central", dp_local_participations=36)
    with pytest.raises(ValueError, match="dp-local-participations.*>= 0"):
        base.replace(dp_local_participations=-1)


def test_accountant_for_a_config_calibrates_to_the_target():
    cfg = ExperimentConfig(dp_mode="central", dp_target_epsilon=4.0, clients_per_round=10, num_rounds=5)
    acc = accountant_for(cfg, num_clients=40)
    assert acc.rate == 0.25
    assert acc.epsilon(5) <= 4.0 < acc.epsilon(6)
    assert accountant_for(ExperimentConfig(), 40) is None


def test_local_dp_clips_then_adds_noise():
    cfg = ExperimentConfig(dp_mode="local", dp_clip_norm=0.5, dp_noise_multiplier=0.0)
    u = {"w": np.full(100, 1.0, np.float32)}
    out = local_dp(u, cfg, np.random.default_rng(0))
    assert l2_norm(out) == pytest.approx(0.5, rel=1e-6)  # no noise: clipping only
    noisy = local_dp(u, cfg.replace(dp_noise_multiplier=2.0), np.random.default_rng(0))
    assert np.std(noisy["w"] - out["w"]) == pytest.approx(1.0, rel=0.2)  # std z * C = 1


def test_dp_settings_are_validated_with_clear_messages():
    with pytest.raises(ValueError, match="dp-mode"):
        ExperimentConfig(dp_mode="global")
    with pytest.raises(ValueError, match="dp-mode.*protocol = logits"):
        ExperimentConfig(dp_mode="central", protocol="logits")
    with pytest.raises(ValueError, match="dp-delta"):
        ExperimentConfig(dp_delta=0.0)
    with pytest.raises(ValueError, match="selection"):
        ExperimentConfig(dp_mode="central", selection="budget")
