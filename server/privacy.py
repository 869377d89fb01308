"""The privacy budget of a run: the accountant (:class:`fedkd.privacy.PrivacyAccountant`), wired in.

Like Opacus' accountant it only records releases and answers what they cost; this part
decides when a round may not run (the target epsilon would be exceeded), which devices sit
out (local DP: a device out of budget), writes ``privacy.json`` after every release, and
saves and restores the accountant with the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedkd.privacy import PrivacyAccountant
from fedkd.results import write_json
from server.aggregation import Aggregate

log = logging.getLogger("fedkd")


class PrivacyBudget:
    def __init__(self, accountant: PrivacyAccountant, *, clip: float, eligible: list[int], out: Path,
                 num_rounds: int) -> None:
        self.acc, self.clip, self.eligible, self.out = accountant, clip, eligible, out
        self.stop: dict | None = None
        self.clipper, self.update_noise = None, None  # adaptive clipping (see adapt)
        self.ddp, self.threshold = None, None  # distributed DP's mechanism (see distribute)
        if accountant.cap:  # local DP priced for K updates: "after num-rounds rounds" would price a device in all
            log.info("differential privacy (local): clip %.4g, noise multiplier %.4g; a device sends at most %d "
                     "noisy updates (dp-local-participations), epsilon %.4g at delta %g for one that sends them all",
                     clip, accountant.noise_multiplier, accountant.cap, accountant.epsilon(accountant.cap),
                     accountant.delta)
        else:
            log.info("differential privacy (%s): clip %.4g, noise multiplier %.4g, sampling rate %.4g, "
                     "epsilon after %d rounds %.4g at delta %g", accountant.mode, clip, accountant.noise_multiplier,
                     accountant.rate, num_rounds, accountant.epsilon(num_rounds), accountant.delta)

    def adapt(self, clipper, update_noise: float) -> None:
        """Adaptive clipping is on: ``clipper`` (a QuantileClip; the aggregator owns and checkpoints
        it) moves the clip norm, and the sum's noise multiplier is ``update_noise``. The accountant
        is unchanged: the sum and the noisy count together are one Gaussian release at its ``z``."""
        self.clipper, self.update_noise = clipper, update_noise
        log.info("adaptive clipping: from C = %.4g towards the %.3g quantile of update norms (lr %.3g); noisy "
                 "count std %.4g over %.4g expected clients; sum noise multiplier %.4g (accounted: %.4g)",
                 clipper.clip, clipper.quantile, clipper.lr, clipper.count_stddev, clipper.expected, update_noise,
                 self.acc.noise_multiplier)

    def distribute(self, setting, *, threshold: float) -> None:
        """Distributed DP: the devices add the noise (``setting``, a :class:`fedkd.ddp.Setting`);
        the accountant prices its sum when only ``threshold`` of a round's devices survive."""
        self.ddp, self.threshold = setting, threshold
        log.info("distributed DP: %d-bit grid (%d steps per clip norm), rounded norm bound %.4g steps (%.2f%% above "
                 "the clip), sum noise std %.4g steps (%.4g x the clip norm), each device's share of it at a "
                 "threshold of %g of a round's devices; tau %.3g over %d coordinates", setting.bits,
                 setting.levels, setting.bound, 100 * (setting.bound / setting.levels - 1), setting.std,
                 setting.std / setting.levels, threshold, self.acc.tau, self.acc.dim)
        if setting.bound > 1.25 * setting.levels:
            log.warning("distributed DP: rounding %d coordinates onto a grid of %d steps per clip norm raises the "
                        "sensitivity, and with it the noise, %.2fx; more quant-bits (32: 16-bit codes) cost a few "
                        "ring bits and remove most of it", setting.dim, setting.levels, setting.bound / setting.levels)

    def refuses(self, r: int) -> bool:
        """With a target epsilon: refuse round ``r`` if its release would take epsilon past the
        target (local DP: once no device may send another noisy update, by the target or by
        ``dp-local-participations``), and say so in the log and the summary (training stops; the
        run goes on to test the model chosen so far)."""
        acc = self.acc
        if not acc.target_epsilon and not acc.cap:
            return False
        capped = False
        if acc.mode == "local":  # devices out of budget sit out; stop when none is left
            if not all(acc.exhausted(p) for p in self.eligible):
                return False
            eps = acc.would_exceed(self.eligible)[1]
            capped = bool(acc.cap) and all(acc.participations.get(p, 0) >= acc.cap for p in self.eligible)
        else:
            over, eps = acc.would_exceed()
            if not over:
                return False
        why = (f"every device has sent the {acc.cap} noisy updates dp-local-participations allows (epsilon "
               f"{acc.epsilon():.4g} at delta {acc.delta:g})" if capped else
               f"round {r} would raise epsilon from {acc.epsilon():.4g} to {eps:.4g}, over the target "
               f"{acc.target_epsilon:g} at delta {acc.delta:g}")
        self.stop = {"round_refused": r, "rounds_trained": r - 1, "epsilon_spent": acc.epsilon(),
                     "epsilon_next": eps, "target_epsilon": acc.target_epsilon, "delta": acc.delta,
                     "reason": f"{why}; training stopped after round {r - 1}"}
        log.warning("privacy budget: %s", self.stop["reason"])
        return True

    def may_train(self, pid: int) -> bool:
        """Local DP: a device whose own budget is spent sits out."""
        return self.acc.mode != "local" or not self.acc.exhausted(pid)

    def record(self, agg: Aggregate, released: list[int]) -> dict:
        """Record the round's release (central: the noisy aggregate, if there was one; local:
        every device that sent a noisy update) and return metrics.csv's dp columns."""
        acc = self.acc
        if acc.mode != "local" and not agg.released:  # a void secure sum releases nothing
            return {"dp_epsilon": acc.epsilon(), "dp_clipped": "", "dp_norm_median": ""}
        acc.record() if acc.mode == "central" else acc.record(released)
        write_json(self.out / "privacy.json", acc.report())
        norms, clip = agg.norms, agg.clip if agg.clip is not None else self.clip
        return {"dp_epsilon": acc.epsilon(), "dp_clipped": sum(1 for x in norms if x > clip) if norms else "",
                "dp_norm_median": float(np.median(norms)) if norms else "", **agg.columns}

    def summary(self) -> dict:
        eps = self.acc.epsilon()
        report = {**self.acc.report(), "stopped": self.stop}
        if self.clipper is not None:
            c = self.clipper
            report["adaptive_clip"] = {"initial_clip": self.clip, "final_clip": c.clip, "quantile": c.quantile,
                                       "lr": c.lr, "count_stddev": c.count_stddev, "expected_clients": c.expected,
                                       "update_noise_multiplier": self.update_noise}
        if self.ddp is not None:
            report["distributed"] = {**self.ddp.to_dict(), "secagg_threshold": self.threshold,
                                     "noise": "discrete Gaussian shares of variance sigma^2 / t on each device"}
        return {"dp_epsilon": eps if np.isfinite(eps) else "inf", "privacy": report}

    def state_dict(self) -> dict:
        return {"accountant": self.acc.to_dict(), "stop": self.stop}

    def load_state_dict(self, state: dict) -> None:
        vars(self.acc).update(vars(PrivacyAccountant.from_dict(state["accountant"])))  # in place: shared with CentralDP
        self.stop = state["stop"]
