"""Every experiment file shipped under simulations/ parses and validates (a typo fails here, not mid-sweep)."""

from pathlib import Path

import pytest

from simulations.cli import load_overrides

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "simulations").glob("*.toml")) + sorted((ROOT / "simulations" / "experiments").glob("*.toml"))


def test_there_are_example_files():
    assert len(FILES) >= 6


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_experiment_file_is_valid_and_commented(path):
    overrides = load_overrides([path])
    assert overrides, "an experiment file with no overrides says nothing"
    assert path.read_text().lstrip().startswith("#"), "each file opens with a comment saying why"
