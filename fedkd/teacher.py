"""Train the cloud teacher once and cache it on disk.

The teacher is the slowest part of an experiment and depends only on its own config and
the cloud data, so sweeps over federated settings reuse one file keyed by a hash of
exactly those inputs. A damaged cache must never cost more than a retrain.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedkd.metrics import EvalSetLike
from fedkd.models import ModelConfig, build_model
from fedkd.train import TrainConfig, train_central

CACHE_VERSION = 1  # bump when training code changes what a config produces


def teacher_cache_key(model_cfg: ModelConfig, train_cfg: TrainConfig, data_fingerprint: str,
                      extra: Mapping[str, object] | None = None) -> str:
    """First 16 hex digits of the sha256 of a canonical (sorted, compact) JSON of every input
    that changes the trained weights; ``extra`` holds anything else the caller varies."""
    payload = {"version": CACHE_VERSION, "model": asdict(model_cfg), "train": _train_key(train_cfg),
               "data": data_fingerprint, "extra": dict(extra or {})}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# TrainConfig fields added after teachers were cached: left out of the key while at their
# default, so adding an option does not invalidate every cached teacher.
_LATER_FIELDS = {"lr_schedule": "constant", "warmup_epochs": 0.0, "min_epochs": 0, "amp": False,
                 "val_smoothing": 1}


def _train_key(train_cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(train_cfg).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}


def _load(path: Path, model_cfg: ModelConfig) -> tuple[nn.Module, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never unpickle code
    if blob["model_config"] != asdict(model_cfg):
        raise ValueError("model config in the file does not match the requested one")
    model = build_model(model_cfg)  # seeded init, overwritten: leaves the global RNG alone
    model.load_state_dict(blob["state_dict"])
    return model, dict(blob["info"])


def _save_atomic(obj: dict, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_fingerprint: str,
                  train: tuple[np.ndarray, np.ndarray], valid: EvalSetLike, *, cache_dir: Path | str,
                  extra: Mapping[str, object] | None = None, progress: Callable[[dict], None] | None = None,
                  device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Return the teacher (best-by-validation weights, on ``device``) and an info dict with
    key, cached, best_epoch, best_valid_ndcg, seconds (of the original training), epochs_run,
    history and path. The init seed is ``train_cfg.seed``, so the key covers it."""
    key = teacher_cache_key(model_cfg, train_cfg, data_fingerprint, extra)
    path = Path(cache_dir) / f"teacher-{key}.pt"
    if path.exists():
        try:
            model, info = _load(path, model_cfg)
            return model.to(device), {**info, "key": key, "cached": True, "path": str(path)}
        except Exception as err:  # corrupt, truncated, foreign or stale file: retrain over it
            warnings.warn(f"ignoring unreadable teacher cache {path}: {err!r}; retraining", RuntimeWarning,
                          stacklevel=2)
    model = build_model(model_cfg, seed=train_cfg.seed).to(device)
    t0 = time.perf_counter()
    result = train_central(model, train, valid, train_cfg, progress=progress)
    info = {"key": key, "cached": False, "best_epoch": result.best_epoch,
            "best_valid_ndcg": result.best_valid_ndcg, "seconds": time.perf_counter() - t0,
            "epochs_run": result.epochs_run, "history": result.history, "path": str(path)}
    _save_atomic({"model_config": asdict(model_cfg), "train_config": asdict(train_cfg),
                  "state_dict": result.state, "info": info}, path)
    return model, info
