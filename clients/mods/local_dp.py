"""Local differential privacy as a Flower mod: each device clips and noises its own update.

Not Flower's ``LocalDpMod``: that one clips and noises the float parameters in the *reply*,
after the handler, with numpy's global generator and an (epsilon, delta) Gaussian per message.
fedkd's reply is a quantised update, which must be noised before it is quantised; the noise
is ``z * C`` with ``z`` from the run's accountant settings (``fedkd.privacy.local_dp``) and draws
from its own named stream, so a run repeats and no other draw shares its numbers; with
``dp-secure-rng`` from the operating system's CSPRNG instead (``fedkd.privacy.SecureGenerator``),
so that nobody who knows the run's seed can recompute the noise.

With ``dp-local-participations = K`` the noise is calibrated for K noisy updates, and the device
counts what it has sent and refuses a (K+1)-th train message itself: under local DP the device
trusts no one, so its guarantee must not rest on the server's choosing it at most K times. (The
server also stops picking it; a device refuses only a server that did not.)
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.mods.update import update_step
from clients.node import round_of, setup
from fedkd.privacy import dp_rng, local_dp
from fedkd.streams import Stream

SENT = "local-dp-sent"  # context.state: the noisy updates this device has sent (dp-local-participations)


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg, data = setup(context)
    if cfg.dp_mode != "local":
        return call_next(msg, context)
    sent = int(context.state[SENT]["count"]) if SENT in context.state else 0
    if cfg.dp_local_participations and sent >= cfg.dp_local_participations:
        raise RuntimeError(f"local DP: device {data.partition_id} has sent {sent} noisy updates, all that "
                           f"dp-local-participations = {cfg.dp_local_participations} allows; it sits out")
    rng = dp_rng(cfg.dp_secure_rng, cfg.seed, Stream.LOCAL_DP_NOISE, round_of(msg), data.partition_id)
    with update_step(lambda update: local_dp(update, cfg, rng)):
        reply = call_next(msg, context)
    if cfg.dp_local_participations and not reply.has_error():
        context.state[SENT] = ConfigRecord({"count": sent + 1})
    return reply
