"""Config parsing: one source of defaults, clear errors for bad keys and values."""

import tomllib
from pathlib import Path

import pytest

from fedkd.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_knob_with_the_dataclass_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == ExperimentConfig().to_flat()


def test_from_flat_round_trips_and_coerces_cli_strings():
    cfg = ExperimentConfig.from_flat({"num-rounds": "7", "kd-weight": "0.5", "progress": "false"})
    assert (cfg.num_rounds, cfg.kd_weight, cfg.progress) == (7, 0.5, False)
    assert ExperimentConfig.from_flat(cfg.to_flat()) == cfg


def test_unknown_key_is_named_with_suggestions():
    with pytest.raises(ValueError, match=r"Unknown config key 'kd-wieght'.*kd-weight"):
        ExperimentConfig.from_flat({"kd-wieght": 1.0})


@pytest.mark.parametrize("key, value, fragment", [
    ("quant-bits", 7, "'quant-bits' has invalid value 7: allowed 2, 4, 8 or 32"),
    ("cloud-fraction", 1.0, "'cloud-fraction' has invalid value 1.0: allowed a number in [0, 1)"),
    ("num-rounds", 0, "'num-rounds' has invalid value 0: allowed an integer >= 1"),
    ("num-rounds", 2.5, "'num-rounds' must be an integer, got 2.5"),
    ("progress", "maybe", "'progress' must be true or false"),
    ("local-lr", float("nan"), "'local-lr' has invalid value nan"),
    ("tier-steps", "4", "'tier-steps' has invalid value '4': allowed 2 comma-separated integers"),
    ("tier-shares", "0.5,0.6", "non-negative numbers that sum to 1"),
    ("student-dim", 10, "a multiple of student-heads"),
    ("data-min-interactions", 2, "leave-one-out"),
    ("experiment-name", "a/b", "without '/'"),
])
def test_bad_values_say_key_value_and_what_is_allowed(key, value, fragment):
    overrides = {key: value}
    if key == "student-dim":
        overrides["student-heads"] = 4
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_flat(overrides)
    assert fragment in str(err.value)


def test_tiers_parse_in_order():
    cfg = ExperimentConfig.from_flat({"tier-names": "a,b,c", "tier-shares": "0.2,0.3,0.5",
                                      "tier-steps": "1,2,3"})
    assert cfg.tiers == [("a", 0.2, 1), ("b", 0.3, 2), ("c", 0.5, 3)]


def test_configuration_reference_is_current():
    from simulations.config_doc import render
    assert (ROOT / "docs" / "configuration.md").read_text() == render()


@pytest.mark.parametrize("flat, message", [
    ({"protocol": "gossip"}, "'protocol' has invalid value 'gossip'"),
    ({"protocol": "proxy", "kd-weight": 0.0}, "'kd-weight' has invalid value 0.0"),
    ({"protocol": "local", "teacher-refine-steps": 5}, "'teacher-refine-steps' has invalid value 5"),
    ({"protocol": "logits", "cloud-fraction": 0.0, "kd-weight": 0.0}, "'cloud-fraction' has invalid value 0.0"),
    ({"cloud-fraction": 0.0}, "'cloud-fraction' has invalid value 0.0"),
    ({"fd-teacher-weight": 1.5}, "'fd-teacher-weight' has invalid value 1.5"),
    ({"secure-aggregation": True, "error-feedback": True}, "'error-feedback' has invalid value True"),
    ({"secure-aggregation": True, "update-density": 0.1}, "'update-density' has invalid value 0.1"),
])
def test_protocol_settings_that_cannot_work_are_refused(flat, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.from_flat(flat)


def test_which_protocols_need_a_teacher_and_a_proxy_set():
    def cfg(**kw):
        return ExperimentConfig.from_flat({k.replace("_", "-"): v for k, v in kw.items()})
    assert cfg().needs_teacher and not cfg(kd_weight=0.0).needs_teacher
    assert not cfg(protocol="logits", fd_teacher_weight=0.0).needs_teacher
    assert cfg(protocol="logits", fd_teacher_weight=0.0).needs_proxy  # public data, no teacher (DS-FL)
    assert cfg(kd_weight=0.0, teacher_refine_steps=3).needs_teacher
    assert cfg(protocol="local").stateful_clients and not cfg(protocol="params").stateful_clients
