"""Which parts an experiment runs with: the one place where the config picks them.

Cross-feature rules live here, once: central DP samples clients by Poisson draws and wraps
the sum (clipped by the server, or by the devices under secure aggregation); distributed DP
samples the same way and wraps the secure sum whose devices added the noise; local DP weighs
updates equally; secure aggregation adds its key exchange before the train messages.
"""

from __future__ import annotations

import copy
import functools
import logging
import time

from flwr.serverapp import Grid

from fedkd import shards
from fedkd.edge import client_data
from fedkd.local import get_state
from fedkd.models import build_model, num_parameters
from fedkd.nested import sub_layout
from fedkd.population import population
from fedkd.privacy import QuantileClip, accountant_for, adaptive_noise_split, distributed_for
from fedkd.secagg import refusal_chance, sizes_of
from fedkd.server_opt import make_server_optimizer
from server.aggregation import CentralDP, ClippedSum, DistributedDP, FedAvgStep, SecureSum, ServerStep, WeightedMean
from server.attacks import ReconstructionAttack, membership_step, reconstruction_step
from server.cloud import Cloud
from server.evaluation import Evaluator
from server.fleet import Fleet
from server.kd_schedule import KDSchedule
from server.privacy import PrivacyBudget
from server.references import reference_step
from server.protocols import make_protocol
from server.sampling import FixedSizeSampler, PoissonSampler

log = logging.getLogger("fedkd")


def compose(exp, grid: Grid) -> None:
    """Build every part of ``exp`` (an :class:`server.experiment.Experiment`) from its config."""
    cfg, t0 = exp.cfg, time.perf_counter()
    exp.cloud = cloud = Cloud(cfg)
    t_cloud = time.perf_counter()
    exp.student = build_model(cfg.student_model(cloud.num_items), seed=cfg.seed)
    exp.warm_start = cloud.warm_start(exp.student) if cfg.warms_up else None
    t_warm = time.perf_counter()
    pop = population(cfg)  # loaded by the cloud already; the fingerprints every device must have
    expected = functools.partial(shards.fingerprint, cfg, pop)  # partition id -> the fingerprint it must have
    nodes = exp.transport.handshake(grid, admit=functools.partial(shards.admit, num_partitions=pop.num_clients,
                                                                  expected=expected),
                                    expected=pop.num_clients, describe=describer(cfg, expected))
    if not nodes:
        raise RuntimeError("no client passed the handshake (rejections.jsonl says why); nothing to train")
    exp.startup = {"cloud_setup_s": t_cloud - t0, "warm_start_s": t_warm - t_cloud,
                   "handshake_s": time.perf_counter() - t_warm}
    log.info("start-up: teacher and proxy set %.1fs, warm start %.1fs, handshake with %d nodes %.1fs",
             exp.startup["cloud_setup_s"], exp.startup["warm_start_s"], len(nodes), exp.startup["handshake_s"])
    exp.fleet = fleet = Fleet(cfg, nodes, cfg.student_model(cloud.num_items), cloud.num_clients)
    if cfg.dp_mode == "distributed":  # the devices' mechanism, which depends on the update's dimension
        accountant, exp.ddp = distributed_for(cfg, len(fleet.eligible), update_dim(cfg, fleet))
    else:
        accountant, exp.ddp = accountant_for(cfg, len(fleet.eligible)), None
    exp.privacy = (PrivacyBudget(accountant, clip=cfg.dp_clip_norm, eligible=fleet.eligible, out=exp.out,
                                 num_rounds=cfg.num_rounds) if accountant is not None else None)
    if exp.ddp is not None:
        exp.privacy.distribute(exp.ddp, threshold=cfg.secagg_threshold)
    log.info("protocol %s: %d clients, student %d parameters, %d rounds", cfg.protocol, len(nodes),
             num_parameters(exp.student), cfg.num_rounds)
    if cfg.dp_mode in ("central", "distributed"):  # what the amplification bound assumes
        exp.sampler = PoissonSampler(seed=cfg.seed, rate=accountant.rate, secure_rng=cfg.dp_secure_rng)
    else:
        exp.sampler = FixedSizeSampler(seed=cfg.seed, k=cfg.clients_per_round, policy=cfg.selection,
                                       tier_of=fleet.tier_of)
    aggregator = make_aggregator(cfg, exp, fleet, accountant)
    exp.before_train = getattr(aggregator, "before_train", None)
    exp.kd = KDSchedule(cfg, cloud, copy.deepcopy(exp.student))
    unused = unused_settings(cfg, exp.kd)
    if unused:
        log.info("protocol %s does not use %s", cfg.protocol, ", ".join(unused))
    exp.protocol = make_protocol(cfg.protocol, cfg=cfg, cloud=cloud, student=exp.student, fleet=fleet,
                                 aggregator=aggregator, server_step=make_server_step(cfg), privacy=exp.privacy,
                                 kd=exp.kd)
    initial = None if cfg.stateful_clients else get_state(exp.student)
    exp.evaluator = Evaluator(cfg, fleet, exp.transport, exp.out, initial_state=initial)
    exp.observers = {}  # parts that read each round's decoded uploads (and are checkpointed)
    if cfg.reconstruction_attack and cfg.protocol == "params":
        secure = getattr(aggregator, "inner", aggregator) if cfg.secure_aggregation else None
        exp.observers[ReconstructionAttack.name] = ReconstructionAttack(cfg, secure=secure)
    exp.end_of_run = [reference_step(cfg, cloud.teacher)]
    if cfg.membership_attack:
        exp.end_of_run.append(membership_step(cfg, exp.out))
    if cfg.reconstruction_attack:
        exp.end_of_run.append(reconstruction_step(cfg, exp.observers.get(ReconstructionAttack.name)))


def describer(cfg, expected):
    """``handshake = "registration-order"``: partition id -> (tier, examples, fingerprint), what a
    simulated node derived from this run config answers at the handshake, derived the same way
    (fedkd.edge.client_data); None when every node must be asked (``ask``; secure aggregation,
    whose handshake carries each device's key)."""
    if cfg.handshake != "registration-order" or cfg.secure_aggregation:
        return None

    def describe(pid: int):
        data = client_data(cfg, pid)
        return data.tier, len(data.train[1]), expected(pid)
    return describe


def unused_settings(cfg, kd: KDSchedule) -> list[str]:
    """The server settings that are defaults of every run but act only on a global student."""
    unused = []
    if cfg.protocol != "params":
        unused += [f"server-optimizer = {cfg.server_optimizer}"] if cfg.server_optimizer != "fedavg" else []
        unused += ([f"server-lr-schedule = {cfg.server_lr_schedule}"] if cfg.server_lr_schedule != "constant"
                   else [])
    if cfg.warm_start_steps and not cfg.warms_up:
        unused.append(f"warm-start-steps = {cfg.warm_start_steps} (" + ("kd-weight is 0" if cfg.protocol == "params"
                                                                        else "no global student") + ")")
    if kd.schedule != cfg.kd_schedule:
        unused.append(f"kd-schedule = {cfg.kd_schedule} (kd-weight stays constant)")
    return unused


def make_server_step(cfg):
    """The server optimizer that turns the round's mean update into the next global student.

    ``fedavg`` keeps :class:`FedAvgStep` (float32 arithmetic, so runs from before the server
    optimizers existed stay byte-identical); the others are :mod:`fedkd.server_opt`, with
    Flower's parameter names. Either follows ``server-lr-schedule`` over the rounds.
    """
    if cfg.server_optimizer == "fedavg":
        return ServerStep(FedAvgStep(cfg.server_lr), schedule=cfg.server_lr_schedule, num_rounds=cfg.num_rounds,
                          final=cfg.server_lr_final)
    params = {"fedavgm": {"server_learning_rate": cfg.server_lr, "server_momentum": cfg.server_momentum},
              "fedadam": {"eta": cfg.server_lr, "beta_1": cfg.server_beta_1, "beta_2": cfg.server_beta_2,
                          "tau": cfg.server_tau},
              "fedadagrad": {"eta": cfg.server_lr, "tau": cfg.server_tau}}
    params["fedyogi"] = params["fedadam"]
    return ServerStep(make_server_optimizer(cfg.server_optimizer, **params[cfg.server_optimizer]),
                      schedule=cfg.server_lr_schedule, num_rounds=cfg.num_rounds, final=cfg.server_lr_final)


def update_dim(cfg, fleet: Fleet) -> int:
    """Coordinates of a device's update at full width: what distributed DP clips, rounds and noises."""
    return sum(sizes_of(sub_layout(fleet.full_model, cfg.student_dim)))


def _warn_of_refusals(cfg, eligible: int) -> None:
    """Injected faults drop devices after they shared their seeds; say up front how often that will
    void a secure round (fedkd.secagg.refusal_chance), so a run of refused rounds is no surprise."""
    lost = min(1.0, cfg.fault_crash + cfg.fault_hang + cfg.fault_corrupt)
    if lost <= 0:
        return
    n = min(cfg.clients_per_round, eligible) if cfg.clients_per_round > 0 else eligible
    chance = refusal_chance(n, cfg.secagg_shares, cfg.secagg_threshold, lost, group=cfg.secagg_group_size)
    if chance > 0.05:
        graph = (f"groups of at most {cfg.secagg_group_size}" if cfg.secagg_group_size else
                 f"neighbourhoods of {cfg.secagg_shares}" if 0 < cfg.secagg_shares < n else "all devices")
        log.warning("secure aggregation: with %.0f%% of devices failing after sharing (fault-*), a round of %d "
                    "(%s, secagg-threshold %g) is refused with probability up to %.0f%%; raise secagg-shares or "
                    "lower secagg-threshold", 100 * lost, n, graph, cfg.secagg_threshold, 100 * chance)


def make_aggregator(cfg, exp, fleet: Fleet, accountant):
    """The update path of the params protocol, from the config."""
    if cfg.secure_aggregation:
        _warn_of_refusals(cfg, len(fleet.eligible))
        # central or distributed DP: a data-independent grid (ranges that adapt would leak un-noised)
        fixed = cfg.dp_mode in ("central", "distributed")
        total = SecureSum(fleet.full_model, cfg.student_dim, exp.transport, quant_bits=cfg.quant_bits,
                          threshold=cfg.secagg_threshold, initial_range=cfg.dp_clip_norm if fixed else cfg.secagg_range,
                          adaptive=not fixed, weighted=cfg.dp_mode == "off", noise=getattr(exp, "ddp", None),
                          shares=cfg.secagg_shares, group_size=cfg.secagg_group_size, seed=cfg.seed)
    else:
        total = ClippedSum(fleet.full_model, fleet.width_of, cfg.student_dim, cfg.dp_clip_norm)
    adaptive, update_noise = None, None
    if cfg.dp_clip_adaptive:  # Andrew et al. 2021: the clip follows a quantile of the norms
        expected = accountant.rate * len(fleet.eligible)
        count_std, update_noise = adaptive_noise_split(accountant.noise_multiplier, expected,
                                                       cfg.dp_clip_count_stddev)
        adaptive = QuantileClip(clip=cfg.dp_clip_norm, quantile=cfg.dp_clip_quantile, lr=cfg.dp_clip_lr,
                                count_stddev=count_std, expected=expected)
        exp.privacy.adapt(adaptive, update_noise)
    if cfg.dp_mode == "distributed":
        return DistributedDP(total, exp.ddp, clip=cfg.dp_clip_norm, rate=accountant.rate,
                             eligible=len(fleet.eligible), adaptive=adaptive)
    if cfg.dp_mode == "central":
        return CentralDP(total, accountant, clip=cfg.dp_clip_norm, eligible=len(fleet.eligible), seed=cfg.seed,
                         template=get_state(exp.student), secure_rng=cfg.dp_secure_rng, adaptive=adaptive,
                         update_noise=update_noise)
    if cfg.secure_aggregation:
        return total
    return WeightedMean(fleet.full_model, fleet.width_of, aggregation=cfg.aggregation,
                        trim_fraction=cfg.trim_fraction, norm_bound=cfg.norm_bound,
                        equal_weights=cfg.dp_mode == "local")
