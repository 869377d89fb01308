"""Every feasibility check of an experiment, run once before any engine starts.

``ExperimentConfig`` checks each value alone and the combinations of values that cannot
work. What it cannot see needs the data and the files a run will read: whether the data
loads, whether the cloud has users and the proxy set rows when distillation needs them,
whether clients-per-round, min-replies and the malicious ids fit the fleet, whether the
device trace, the calibration and the students' memory work, whether differential privacy
can be calibrated (and split with adaptive clipping's noisy count), whether a resume has its
checkpoint, and whether the results folder can be written. :func:`check_experiment` runs all of
them, reads only, writes nothing, and raises ``ValueError`` (``fedkd.data.DataError`` for the
file) with the message a user acts on.

:func:`check_run_config` is the one validation entry point: it parses a flat run config
(every key, value, list and section rule of ``fedkd.config``) and then runs
:func:`check_experiment`. The ServerApp calls it on Flower's ``run_config``, and ``fedkd
run``, ``fedkd deploy`` and ``fedkd data`` on theirs, so each bad input fails the same way,
with the same message, everywhere (under ``flwr run .`` too, before round 1). No Flower import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedkd.config import ExperimentConfig, Scalar
from fedkd.population import Population, population

__all__ = ["Plan", "check_experiment", "check_run_config"]


@dataclass(frozen=True)
class Plan:
    """What the checks found: the population and the sizes a run will use."""

    population: Population
    cloud_prefixes: int  # cloud users' training prefixes: the teacher's samples, the proxy set's source
    proxy_rows: int  # rows of the public proxy set (0 when the protocol needs none)
    trainable: int | None  # clients whose memory holds the narrowest student (None: devices not checked)
    notes: tuple[str, ...] = ()  # things a run does that the user may not expect, said out loud

    @property
    def num_clients(self) -> int:
        return self.population.num_clients

    @property
    def num_cloud_users(self) -> int:
        return len(self.population.cloud_users)

    @property
    def num_edge_users(self) -> int:
        return sum(len(c) for c in self.population.clients)

    def describe(self) -> str:
        """One log line: the data and the layout a run gets."""
        ds = self.population.dataset
        return (f"data {ds.source}: {ds.num_users} users, {ds.num_items} items, {ds.num_interactions} interactions "
                f"({ds.stats.duplicates_dropped} exact duplicate rows dropped); {self.num_cloud_users} cloud users, "
                f"{self.num_edge_users} edge users in {self.num_clients} clients, proxy set {self.proxy_rows} rows")


def _invalid(key: str, value, allowed: str) -> ValueError:
    """The message shape of ``fedkd.config``: key, value, what is allowed."""
    return ValueError(f"Config key '{key}' has invalid value {value!r}: allowed {allowed}.")


def check_run_config(run_config: Mapping[str, Scalar], *,
                     devices: bool = True) -> tuple[ExperimentConfig, Plan]:
    """Parse and check a flat (kebab-case) run config: the config and its plan, or a ValueError.

    The one validation step of every entry point, the ServerApp included: first
    ``ExperimentConfig.from_flat`` (unknown keys, types, list values, each section's rules, the
    rules across sections), then :func:`check_experiment` (data, fleet, devices, privacy,
    resume, results folder). Reads only, writes nothing."""
    cfg = ExperimentConfig.from_flat(run_config)
    return cfg, check_experiment(cfg, devices=devices)


def check_experiment(cfg: ExperimentConfig, *, devices: bool = True) -> Plan:
    """Run every check that needs the data or a file; return the plan, or raise naming the problem.

    Cheap (well under a second on MovieLens-100K, plus importing torch for the device checks);
    the population it loads is cached per process, so the run that follows does not read the
    file again. ``devices=False`` stops after the data and fleet-size checks, before the device
    trace, calibration, memory, privacy and resume checks, which need torch (``fedkd data``,
    which reports on a data file, uses it to answer in about a second)."""
    _check_output(cfg)
    pop = population(cfg)  # DataError names the file, the line and the option that fixes it
    ds, n = pop.dataset, pop.num_clients
    if n < 1:
        raise _invalid("cloud-fraction", cfg.cloud_fraction, "a share that leaves edge users (no edge clients)")
    notes: list[str] = []

    # --- the cloud: teacher training samples and the proxy set
    prefixes = sum(max(len(ds.sequences[u]) - 3, 0) for u in pop.cloud_users)  # = len(train_samples(seq[:-2]))
    needs = [what for what, on in (("the teacher trains on them", cfg.needs_teacher),
                                   ("the proxy set is drawn from them", cfg.needs_proxy)) if on]
    if needs and prefixes == 0:
        why = (f"it puts {len(pop.cloud_users)} of {ds.num_users} users in the cloud" if len(pop.cloud_users) == 0
               else f"its {len(pop.cloud_users)} cloud users have no training prefix (a user needs at least 4 "
                    "interactions: leave-one-out holds out two)")
        raise _invalid("cloud-fraction", cfg.cloud_fraction,
                       f"a share that gives the cloud training histories ({why}; {' and '.join(needs)}); raise "
                       "cloud-fraction, or set kd-weight 0 for a run without a teacher")
    proxy_rows = min(cfg.proxy_size, prefixes) if cfg.needs_proxy else 0
    if cfg.needs_proxy and proxy_rows < cfg.proxy_size:
        notes.append(f"the proxy set has {proxy_rows} rows, fewer than proxy-size {cfg.proxy_size}: the cloud "
                     f"users have only {prefixes} training prefixes")
    if cfg.needs_proxy and cfg.proxy_batch > proxy_rows:
        notes.append(f"each round sends all {proxy_rows} proxy rows, fewer than proxy-batch {cfg.proxy_batch}")
    if cfg.needs_proxy and cfg.kd_top_k > ds.num_items:
        raise _invalid("kd-top-k", cfg.kd_top_k, f"at most the {ds.num_items} items of {ds.source}")

    # --- the fleet
    if cfg.clients_per_round > n:
        raise _invalid("clients-per-round", cfg.clients_per_round,
                       f"0 (every client) or 1..{n} (this fleet has {n} clients)")
    per_round = cfg.clients_per_round or n
    if cfg.min_replies > per_round:
        raise _invalid("min-replies", cfg.min_replies,
                       f"1..{per_round}: at most the clients a round selects ({per_round}); with more, every "
                       "round would be skipped")
    from fedkd.faults import malicious_ids
    bad = sorted(i for i in malicious_ids(cfg) if i >= n)
    if bad:
        raise _invalid("fault-malicious", cfg.fault_malicious,
                       f"partition ids in 0..{n - 1} (this fleet has {n} clients)")

    if not devices:
        return Plan(population=pop, cloud_prefixes=prefixes, proxy_rows=proxy_rows, trainable=None,
                    notes=tuple(notes))

    # --- devices: trace, calibration, memory
    from fedkd.schedule import fleet_profiles, width_for
    from fedkd.simtime import CALIBRATION, load_calibration, step_seconds
    profiles = fleet_profiles(cfg, n)  # reads device-trace (TraceError names its line)
    calibration = load_calibration(cfg.calibration or CALIBRATION)
    for width in cfg.widths:  # the simulated clock needs every width in use (raises, naming it)
        step_seconds(calibration, width)
    trainable = n
    if cfg.protocol == "params" and min(p.memory_mb for p in profiles) < _full_width_mb(cfg, ds.num_items):
        # Some device cannot hold the full student: find each one's widest slice, as the server will.
        # (Skipped when every device holds the full width: slicing builds a meta-device model,
        # whose first use costs torch about 2 s of imports.)
        model = cfg.student_model(ds.num_items)
        fits: dict[float, int | None] = {}
        for p in profiles:
            if p.memory_mb not in fits:
                fits[p.memory_mb] = width_for(p, model, cfg.widths)
        trainable = sum(1 for p in profiles if fits[p.memory_mb] is not None)
        if trainable == 0:
            raise ValueError("no device's memory holds even the narrowest student: raise tier-memory-mb "
                             "or add narrower student-widths")
        if trainable < n:
            notes.append(f"{n - trainable} of {n} devices cannot hold the narrowest student and never train")

    # --- privacy: the noise calibration must exist (cached: the server reuses it)
    if cfg.dp_mode == "distributed":  # also: the shares' size, the count's weight, a ring within 32 bits
        from fedkd.nested import sub_layout
        from fedkd.privacy import distributed_for
        from fedkd.secagg import sizes_of
        distributed_for(cfg, trainable, sum(sizes_of(sub_layout(cfg.student_model(ds.num_items), cfg.student_dim))))
    elif cfg.dp_mode != "off":
        from fedkd.privacy import accountant_for, adaptive_noise_split
        acc = accountant_for(cfg, trainable)
        if cfg.dp_clip_adaptive:  # the count's noise must leave the sum some of the budget
            adaptive_noise_split(acc.noise_multiplier, acc.rate * trainable, cfg.dp_clip_count_stddev)

    # --- resume: a checkpoint of this very experiment
    if cfg.resume:
        from fedkd import checkpoint
        checkpoint.load(Path(cfg.output_dir).expanduser() / cfg.experiment_name, cfg.to_flat())
    return Plan(population=pop, cloud_prefixes=prefixes, proxy_rows=proxy_rows, trainable=trainable,
                notes=tuple(notes))


def _full_width_mb(cfg: ExperimentConfig, num_items: int) -> float:
    """``fedkd.schedule.footprint_mb`` of the full-width student (its full layout is the model's own)."""
    from fedkd.models import build_model
    from fedkd.schedule import BYTES_PER_PARAMETER
    model = build_model(cfg.student_model(num_items), seed=None)
    return sum(t.numel() for t in model.state_dict().values()) * BYTES_PER_PARAMETER / 1e6


def _check_output(cfg: ExperimentConfig) -> None:
    """The results folder must be creatable (nothing is created here)."""
    base = Path(cfg.output_dir).expanduser()
    for path, key, value in ((base, "output-dir", cfg.output_dir),
                             (base / cfg.experiment_name, "experiment-name", cfg.experiment_name)):
        if path.exists() and not path.is_dir():
            raise _invalid(key, value, f"a folder name ({path} is a file)")
    existing = base.absolute()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _invalid("output-dir", cfg.output_dir, f"a folder you can write ({existing} is not writable)")
