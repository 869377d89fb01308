"""The device's behaviours around local training, as Flower mods (``Mod``: ``(Message, Context,
call_next) -> Message``) applied to the ``train`` handler.

The list is outermost first, as Flower applies it. A reply, and an update passing through
:func:`clients.mods.update.finish`, meet the mods from the last one back, so the order below is
the order of the old inline code read backwards: local DP noises the update, a malicious client
boosts the noised update, secure aggregation's clipping bounds what goes under the masks, and
a fault breaks the finished reply (or crashes or hangs before any of it).
"""

from clients.mods.clipping import secagg_clipping_mod
from clients.mods.faults import fault_mod, malicious_mod
from clients.mods.local_dp import local_dp_mod

TRAIN_MODS = [fault_mod, secagg_clipping_mod, malicious_mod, local_dp_mod]

__all__ = ["TRAIN_MODS", "fault_mod", "local_dp_mod", "malicious_mod", "secagg_clipping_mod"]
