"""The message format both apps speak: fedkd's numpy dicts <-> Flower records, and byte counts.

A package of its own so that the ServerApp (``server/``), the ClientApp (``clients/``) and the
tools in ``simulations/`` all import it without any of them depending on another app.
"""

from wire.format import (Arrays, Content, config_of, describe, describe_message, from_record, garble,
                         message_nbytes, message_nbytes_by_part, message_payload, metric_dict, pack, to_record,
                         unpack)

__all__ = ["Arrays", "Content", "config_of", "describe", "describe_message", "from_record", "garble",
           "message_nbytes", "message_nbytes_by_part", "message_payload", "metric_dict", "pack", "to_record",
           "unpack"]
