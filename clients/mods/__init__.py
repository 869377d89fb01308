"""The device's behaviours around local training, as Flower mods (``Mod``: ``(Message, Context,
call_next) -> Message``) applied to the ``train`` handler.

The list is outermost first, as Flower applies it. A reply, and an update passing through
:func:`clients.mods.update.finish`, meet the mods from the last one back, so the list reads
backwards: local DP noises the update (privacy covers what a device really computed), a
malicious client boosts the noised update (a lie, not a private release), secure aggregation's
clipping bounds whatever goes under the masks (the server cannot clip it later), and a fault
breaks the finished reply, or crashes or hangs before any of it. Moving a mod changes results;
tests/test_client_mods.py pins this order.
"""

from clients.mods.clipping import secagg_clipping_mod
from clients.mods.faults import fault_mod, malicious_mod
from clients.mods.local_dp import local_dp_mod

TRAIN_MODS = [fault_mod, secagg_clipping_mod, malicious_mod, local_dp_mod]

__all__ = ["TRAIN_MODS", "fault_mod", "local_dp_mod", "malicious_mod", "secagg_clipping_mod"]
