"""Compressing a student for the edge: pruning, then recovery by distillation, then the
precision the file stores. The parts live in their own modules; this is where they compose.

::

    full student --prune (fedkd.prune)--> masked copy --recover (fedkd.recover, aware of the
    precision)--> fine-tuned copy --make_permanent--> plain tensors with zeros
    --fedkd.export.export_onnx(precision=...)--> file (zeros and precision stored compactly)

Order matters: recovery runs after pruning (the masks stay fixed while it fine-tunes) and
before the export's rounding, under a fake version of that rounding, so what was fine-tuned is
what is stored. The record returned is what ``fedkd export`` writes into the sidecar.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from fedkd.precision import PRECISIONS
from fedkd.prune import KINDS, make_permanent, measure, prune_student
from fedkd.recover import RecoveryConfig, ServerData, divergence, recover

__all__ = ["CompressionSpec", "compress"]


@dataclass(frozen=True)
class CompressionSpec:
    prune_kind: str = "weights"  # weights | rows | dims (fedkd.prune)
    sparsity: float = 0.0  # fraction removed, in [0, 1)
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 (how the file stores the weights)
    recovery: RecoveryConfig = field(default_factory=lambda: RecoveryConfig(steps=0))

    def __post_init__(self) -> None:
        if self.prune_kind not in KINDS:
            raise ValueError(f"prune kind must be one of {KINDS}, got {self.prune_kind!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def compress(full: nn.Module, spec: CompressionSpec, *, data: ServerData | None = None) -> tuple[nn.Module, dict]:
    """A compressed copy of ``full`` (``full`` is not changed) and the record of what was done.

    ``data`` (the server's histories, ``fedkd.recover.server_histories``) is needed when
    ``spec.recovery.steps > 0``; without recovery, if given, the record still reports the
    copy's divergence from ``full`` on it.
    """
    student = copy.deepcopy(full).eval()
    report = prune_student(student, kind=spec.prune_kind, sparsity=spec.sparsity)
    record: dict = {"prune": report.as_dict() if spec.sparsity > 0 else None, "precision": spec.precision,
                    "recovery": None}
    if spec.recovery.steps > 0:
        if data is None:
            raise ValueError("recovery needs the server's histories (data=fedkd.recover.server_histories(cfg))")
        record["recovery"] = recover(student, full, data, spec.recovery, precision=spec.precision)
    elif data is not None:
        record["divergence"] = divergence(student, full, data.histories, temperature=spec.recovery.temperature,
                                          loss=spec.recovery.loss, precision=spec.precision)
    if spec.sparsity > 0:  # the masks held through the fine-tune: the same sparsity after it
        record["prune"]["achieved_after_recovery"] = measure(student, kind=spec.prune_kind).achieved
    return make_permanent(student), record
