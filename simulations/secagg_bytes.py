"""Bytes per client-round of secure aggregation against plain uploads, from the runs' wire logs.

    python -m simulations.secagg_bytes PLAIN_RUN SECURE_RUN [PLAIN_RUN SECURE_RUN ...]

Each pair gives one row of the table in docs/privacy.md. The counts are ``wire.jsonl``'s: every
message's serialised size as Flower sends it (``wire.message_nbytes_by_part``), the same counts
behind metrics.csv's ``bytes_*`` columns. A client-round is one device in one round that
completed its part: for a plain run, a train reply; for a secure run, a device that sent its
shares, its masked update and its unmask answer (a device that dropped sends less). Up is what
the device sends; "down extra" is what the share and unmask steps and the peer list of the
train message add to what it receives.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

SECURE_TYPES = ("query.secagg_keys", "query.secagg_unmask")


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "wire.jsonl").open()]


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["config"]


def _rounds(run: Path) -> set[int]:
    return {ln["round"] for ln in _lines(run) if ln["type"] == "train"}


def per_client_round(run: Path, rounds: set[int] | None = None) -> dict:
    """Mean bytes per completed client-round, by message type and direction (over ``rounds`` only,
    if given)."""
    by = defaultdict(lambda: defaultdict(int))  # (round, partition) -> "type/direction" -> bytes
    for ln in _lines(run):
        if ln["type"] in ("train", *SECURE_TYPES) and "error" not in ln and (rounds is None or ln["round"] in rounds):
            by[(ln["round"], ln["partition_id"])][f"{ln['type']}/{ln['direction']}"] += ln["bytes"]
    secure = bool(_config(run).get("secure-aggregation"))
    need = ["train/up"] + ([f"{t}/up" for t in SECURE_TYPES] if secure else [])
    done = [v for v in by.values() if all(k in v for k in need)]
    keys = sorted({k for v in done for k in v})
    return {"client_rounds": len(done), **{k: sum(v.get(k, 0) for v in done) / max(len(done), 1) for k in keys}}


def row(plain: Path, secure: Path) -> dict:
    """One pair, over the rounds both ran: a train message's size changes over a run (the
    distillation batch stops when the gate closes), so a 3-round secure run is set against the
    same 3 rounds of a longer plain run."""
    common = _rounds(plain) & _rounds(secure)
    p, s = per_client_round(plain, common), per_client_round(secure, common)
    cfg = _config(secure)
    up_plain = p["train/up"]
    up_secure = s["train/up"] + s["query.secagg_keys/up"] + s["query.secagg_unmask/up"]
    down_secure = s["train/down"] + s["query.secagg_keys/down"] + s["query.secagg_unmask/down"]
    return {"data": Path(cfg.get("data-path") or "synthetic").name, "bits": cfg.get("quant-bits", 8),
            "devices_per_round": cfg.get("clients-per-round") or "all", "plain_up": up_plain,
            "masked_update": s["train/up"], "shares_up": s["query.secagg_keys/up"],
            "unmask_up": s["query.secagg_unmask/up"], "secure_up": up_secure, "ratio_up": up_secure / up_plain,
            "down_extra": down_secure - p["train/down"],
            "ratio_up_and_down": (up_secure + down_secure) / (up_plain + p["train/down"]),
            "client_rounds": s["client_rounds"]}


def table(rows: list[dict]) -> str:
    out = ["| data | bits | devices/round | plain upload | masked update | shares (up) | unmask (up) | "
           "secure, all up | up ratio | extra down | up+down ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['data']} | {r['bits']} | {r['devices_per_round']} | {r['plain_up']:,.0f} | "
                   f"{r['masked_update']:,.0f} | {r['shares_up']:,.0f} | {r['unmask_up']:,.0f} | "
                   f"{r['secure_up']:,.0f} | **{r['ratio_up']:.2f}x** | {r['down_extra']:,.0f} | "
                   f"{r['ratio_up_and_down']:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = [row(Path(a), Path(b)) for a, b in zip(args[::2], args[1::2])]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
