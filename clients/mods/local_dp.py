"""Local differential privacy as a Flower mod: each device clips and noises its own update.

Not Flower's ``LocalDpMod``: that one clips and noises the float parameters in the *reply*,
after the handler, with numpy's global generator and an (epsilon, delta) Gaussian per message.
fedkd's reply is a quantised update, which must be noised before it is quantised; the noise
is ``z * C`` with ``z`` from the run's accountant settings (``fedkd.privacy.local_dp``) and draws
from its own named stream, so a run repeats and no other draw shares its numbers; with
``dp-secure-rng`` from the operating system's CSPRNG instead (``fedkd.privacy.SecureGenerator``),
so that nobody who knows the run's seed can recompute the noise.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.mods.update import update_step
from clients.node import round_of, setup
from fedkd.privacy import dp_rng, local_dp
from fedkd.streams import Stream


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg, data = setup(context)
    if cfg.dp_mode != "local":
        return call_next(msg, context)
    rng = dp_rng(cfg.dp_secure_rng, cfg.seed, Stream.LOCAL_DP_NOISE, round_of(msg), data.partition_id)
    with update_step(lambda update: local_dp(update, cfg, rng)):
        return call_next(msg, context)
