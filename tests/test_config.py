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
    ("exchange-window", -1, "'exchange-window' has invalid value -1: allowed an integer >= 0"),
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


# ---------------------------------------------------------------------- sections
def test_every_option_is_in_one_section_and_every_section_has_its_rules():
    from fedkd.config import SECTION_RULES, SECTIONS
    sections = ExperimentConfig.sections()
    assert list(sections) == list(SECTIONS) == list(SECTION_RULES)
    assert all(sections.values()), "an empty section"
    assert sorted(k for keys in sections.values() for k in keys) == sorted(ExperimentConfig.keys())
    for name in ("data", "teacher", "student", "distillation", "wire", "privacy", "fleet", "faults"):
        assert name in sections
    assert ExperimentConfig.section_of("dp-mode") == "privacy" and ExperimentConfig.section_of("tier-steps") == "fleet"


def test_a_section_reads_its_flat_values_and_its_typed_ones():
    cfg = ExperimentConfig.from_flat({"dp-mode": "local", "tier-steps": "4, 8"})
    privacy = cfg.section("privacy")
    assert privacy["dp-mode"] == "local" and privacy.dp_mode == "local" and "kd-weight" not in privacy
    assert dict(privacy) == {k: v for k, v in cfg.to_flat().items() if k in ExperimentConfig.sections()["privacy"]}
    fleet = cfg.section("fleet")
    assert fleet["tier-steps"] == "4, 8" and fleet.tier_steps == (4, 8)  # flat as given; typed as parsed
    with pytest.raises(AttributeError):
        _ = privacy.tier_steps
    with pytest.raises(KeyError, match="unknown config section 'reliability'"):
        cfg.section("reliability")


def test_help_and_reference_list_the_options_by_section():
    from simulations.cli import build_parser
    from simulations.config_doc import render
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    groups = {g.title: {a.dest[4:] for a in g._group_actions} for g in run._action_groups}
    for name, keys in ExperimentConfig.sections().items():
        assert groups[f"{name} settings"] == set(keys)
        assert f"\n## {name}\n" in render()


# ---------------------------------------------------------------------- list-valued options
def test_list_options_are_parsed_once_into_tuples_and_written_back_as_given():
    flat = {"tier-names": "a, b", "tier-shares": "0.25,0.75", "tier-steps": "2,8", "tier-speed": "1,2.5",
            "tier-memory-mb": "32", "tier-availability": "0.5,1", "student-widths": "8,16", "test-rounds": "2, 3",
            "fault-corrupt-kinds": "nan,shape", "fault-malicious": "1,4", "data-columns": "user=uid,item=sku"}
    cfg = ExperimentConfig.from_flat(flat)
    lists = cfg.lists
    assert (lists.tier_names, lists.tier_shares, lists.tier_steps) == (("a", "b"), (0.25, 0.75), (2, 8))
    assert (lists.tier_speed, lists.tier_memory_mb, lists.tier_availability) == ((1.0, 2.5), (32.0,), (0.5, 1.0))
    assert (lists.student_widths, lists.test_rounds, lists.fault_malicious) == ((8, 16), (2, 3), (1, 4))
    assert lists.fault_corrupt_kinds == ("nan", "shape") and lists.data_columns == (("user", "uid"), ("item", "sku"))
    assert cfg.tiers == [("a", 0.25, 2), ("b", 0.75, 8)] and cfg.widths == [8, 16]
    assert cfg.extra_test_rounds == {2, 3} and cfg.column_map == {"user": "uid", "item": "sku"}
    assert {k: cfg.to_flat()[k] for k in flat} == flat  # config.json and run_config keep the strings as given
    again = cfg.replace(tier_steps="3,9")
    assert again.lists.tier_steps == (3, 9) and again.lists.tier_names == ("a", "b")


@pytest.mark.parametrize("key, value, allowed", [
    ("tier-steps", "4,x", "positive integers"),
    ("tier-steps", "4,-1", "positive integers"),
    ("tier-shares", "0.5,half", "non-negative numbers that sum to 1"),
    ("tier-speed", "1,fast", "1 number (every tier) or 2 comma-separated numbers (one per tier), each > 0"),
    ("tier-availability", "x", "1 number (every tier) or 2 comma-separated numbers (one per tier), each in [0, 1]"),
    ("student-widths", "8,x", "increasing widths that divide by student-heads and end at student-dim (16)"),
    ("test-rounds", "2,last", "comma-separated rounds in 1..num-rounds (10)"),
    ("fault-malicious", "3,x", "distinct comma-separated partition ids (integers >= 0)"),
    ("data-columns", "user", "'user=COL,item=COL,timestamp=COL' (any subset)"),
])
def test_a_list_value_that_does_not_parse_is_refused_naming_its_option(key, value, allowed):
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_flat({key: value})
    assert str(err.value) == f"Config key '{key}' has invalid value {value!r}: allowed {allowed}."


def test_no_code_parses_a_list_option_again():
    """Consumers read cfg.lists (or tiers, widths, extra_test_rounds, column_map), never the strings."""
    import re
    from dataclasses import fields

    from fedkd.config import ListOptions
    names = "|".join(f.name for f in fields(ListOptions))
    reparse = re.compile(rf"(\.split\(|_split\(|parse_values\(|tier_profiles\().*\b(cfg|config|self\.cfg|c)\.({names})\b"
                         rf"|\b(cfg|config|self\.cfg)\.({names})\b\s*\.split\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("fedkd", "server", "clients", "simulations", "wire")
                 for path in sorted((ROOT / folder).rglob("*.py")) if path.name != "config.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if reparse.search(line)]
    assert not offenders, offenders
