"""The ``fedkd`` command line and the experiments, benchmarks and reports around it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository (and Flower app) root
