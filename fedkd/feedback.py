"""Error feedback for compressed uploads, and the device-local files that hold its memory.

A client that quantises (or sparsifies) its update sends ``Q(u)`` instead of ``u``; the
difference is lost. Error feedback (Seide et al. 2014, Karimireddy et al. 2019) keeps it as
a residual ``e`` and adds it to the next update: send ``Q(u + e)``, keep
``e' = u + e - Q(u + e)``. Over rounds the residual telescopes, so everything a client ever
computed reaches the server except its last residual (``sum u = sum sent + e_T``), which is
what lets 4- or 2-bit and top-k updates track full precision.

The residual is as large as the model and must survive between rounds on the device. It is
not kept in Flower's ``Context.state``: in simulation the node state travels to the worker
and back with every message, so a model-sized residual would add its size to every message
of every client. A device keeps it in its own storage instead: :class:`DeviceStore`, a
folder per run and client (see :func:`device_folder` for where that is).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


def encode_with_feedback(update: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray] | None, *,
                         encode: Callable[[Arrays], Arrays],
                         decode: Callable[[Arrays], Arrays]) -> tuple[Arrays, Arrays]:
    """Compress ``update + residual``; return the wire arrays and the new residual.

    ``decode`` must be what the server will do with the arrays, so the residual is exactly
    what the server will not see. A residual whose keys or shapes differ from the update's
    (a device moved to another student width) is dropped rather than misapplied.

    Returns
    -------
    (arrays, residual)
        ``arrays`` to send; ``residual = corrected - decode(arrays)``, float32.
    """
    usable = residual is not None and set(residual) == set(update) and all(
        np.shape(residual[k]) == np.shape(update[k]) for k in update)
    corrected = {k: (np.asarray(update[k], np.float32) + residual[k]).astype(np.float32) if usable
                 else np.asarray(update[k], np.float32) for k in update}
    arrays = encode(corrected)
    sent = decode(arrays)
    return arrays, {k: (corrected[k] - sent[k]).astype(np.float32) for k in update}


def device_folder(base: str | Path, run_id: int, partition_id: int) -> Path:
    """Where a device keeps its own files for one run: ``<base>/run-<run id>/partition-<id>``.

    The run id keeps a residual of an earlier run from leaking into a new one on a device
    that lives through many runs.
    """
    return Path(base).expanduser() / f"run-{int(run_id)}" / f"partition-{int(partition_id)}"


class DeviceStore:
    """Named groups of arrays in a device's own folder, one ``.npz`` file each, written
    atomically (a crash mid-write leaves the old file, never half a file)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def load(self, name: str) -> Arrays | None:
        path = self.path(name)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, self.path(name))

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
