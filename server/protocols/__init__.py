"""What crosses the wire each round, one class per protocol (``protocol`` in the config).

=========  ==========================================  ===============================
protocol   down                                        up
=========  ==========================================  ===============================
params     student + proxy batch with teacher labels    quantised update
logits     proxy batch with teacher/fleet targets,      top-k predictions on the next
           ids of the next proxy batch                  proxy batch
local      proxy batch with teacher labels if kd > 0    metrics only
proxy      nothing (the server distils on the proxy)    nothing
=========  ==========================================  ===============================

A protocol builds the round's content (:meth:`~server.protocols.base.Protocol.content`),
decodes one reply (``decode``) and folds the accepted uploads into what the server keeps
(``absorb``). A new protocol is a new file here and one line in :func:`make_protocol`.
"""

from server.protocols.base import Protocol
from server.protocols.logits import LogitsProtocol
from server.protocols.params import ParamsProtocol
from server.protocols.proxy import ProxyProtocol

PROTOCOLS = {"params": ParamsProtocol, "logits": LogitsProtocol, "local": Protocol, "proxy": ProxyProtocol}


def make_protocol(name: str, **parts) -> Protocol:
    return PROTOCOLS[name](**parts)


__all__ = ["PROTOCOLS", "Protocol", "make_protocol"]
