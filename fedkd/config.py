"""One typed, validated view of every experiment knob, in sections.

Flower hands apps a flat ``run_config`` of kebab-case scalars; this module parses it once
into a frozen dataclass so the rest of fedkd works with typed fields and never re-reads
strings. Every field's default is also declared in ``[tool.flwr.app.config]`` of
``pyproject.toml`` (a test keeps the two identical), because ``flwr run --run-config``
may only override keys the app declares.

**Sections.** Every option belongs to one section of :data:`SECTIONS` (data, teacher,
student, distillation, wire, privacy, fleet, faults, ...): a ``_section("name")`` line in the
class body opens it, and every option declared after it belongs to it (recorded in the
field's metadata). Keys stay flat on the wire, in ``pyproject.toml`` and in ``config.json``
(Flower requires a flat run_config); :meth:`ExperimentConfig.section` reads one section,
and the ``--help`` of ``fedkd run`` and docs/configuration.md list the options by section.

**Validation** runs once, when a config is built: the list-valued options are parsed into
tuples (:class:`ListOptions`, ``cfg.lists``), then each section's own rules check its values
(:data:`SECTION_RULES`), then :func:`_rules_across` checks the combinations that span
sections. Every error is ``ValueError("Config key 'KEY' has invalid value V: allowed ...")``.
The checks that need the data or files are :mod:`fedkd.checks`, whose
``check_run_config`` is the one entry point of ``fedkd run`` and the ServerApp alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: parsing a config (and refusing a bad one) needs no torch
    from fedkd.models import ModelConfig
    from fedkd.train import TrainConfig

Scalar = bool | int | float | str

#: The sections of the configuration, in the order help and docs show them: name -> what it holds.
SECTIONS: dict[str, str] = {
    "experiment": "Names and folders of the results, the seed, the progress bar, resuming a killed run.",
    "data": "The interaction data (a file or synthetic), the cloud / edge split and the clients' users.",
    "teacher": "The cloud's teacher model and its central training.",
    "student": "The edge devices' student model.",
    "protocol": "What crosses the wire each round, and what the server distils itself.",
    "rounds": "Rounds, local training, the server's step, evaluation, model choice and stopping.",
    "fleet": "Device tiers and profiles, deadlines, nested students and client selection (docs/budgets.md).",
    "distillation": "The distillation loss, its weight over rounds and the public proxy set.",
    "wire": "How models, updates and soft labels are encoded, and what is logged of them "
            "(docs/communication.md).",
    "privacy": "Differential privacy, secure aggregation and the membership attack (docs/privacy.md).",
    "faults": "Faults the ClientApp injects: crashes, hangs, corrupt and malicious replies (docs/reliability.md).",
    "defences": "What the server does about bad replies: size limit, quorum, robust aggregation "
                "(docs/reliability.md).",
}

_opening: list[str] = [""]  # the section the options declared next belong to (set by _section)


def _section(name: str) -> None:
    """In the class body: the options declared after this line, up to the next one, belong to ``name``."""
    if name not in SECTIONS:
        raise ValueError(f"unknown config section {name!r}; add it to SECTIONS")
    _opening[0] = name


def _opt(default: Scalar, help: str) -> Any:  # noqa: A002 - "help" reads best in the table below
    return field(default=default, metadata={"help": help, "section": _opening[0]})


# What a run did when its config.json has no such key: the key came later, and its default
# has since changed (issue 21's defaults). Reading old results (sweep staleness) uses these.
ABSENT_MEANS: dict[str, Scalar] = {"server-lr-schedule": "constant", "warm-start-steps": 0,
                                   "server-optimizer": "fedavg", "kd-schedule": "constant"}


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of a fedkd experiment; the kebab-case name of ``foo_bar`` is ``foo-bar``."""

    _section("experiment")  # --------------------------------------------------------------
    experiment_name: str = _opt("default", "Name of the results folder under output-dir.")
    output_dir: str = _opt("outputs", "Folder that holds one results folder per experiment.")
    cache_dir: str = _opt(".cache/fedkd", "Where trained teachers are cached (keyed by config + data hash).")
    seed: int = _opt(0, "Experiment seed; every random draw (split, sampling, init, rounding) derives from it.")
    progress: bool = _opt(True, "Show a progress bar while the run goes (`fedkd run`: only when stderr is a "
                                "terminal, so that bar and log lines never share a line); the per-round log "
                                "lines are written either way.")
    _section("data")  # --------------------------------------------------------------------
    data_path: str = _opt("", "Interaction file (u.data, ratings.csv, CSV/TSV/parquet); empty = synthetic data.")
    data_format: str = _opt("auto", "auto | ml-100k | ml-csv | csv | tsv | parquet.")
    data_columns: str = _opt("", "Column mapping for generic files, e.g. 'user=uid,item=sku,timestamp=ts'.")
    data_min_interactions: int = _opt(3, "Users need at least this many interactions (>= 3 for leave-one-out).")
    data_drop_short_users: bool = _opt(False, "Drop users below data-min-interactions instead of failing.")
    data_duplicates: str = _opt("drop", "Exact duplicate rows (same user, item and timestamp): drop (counted in "
                                        "the log and summary.json) | keep | error (refuse the file, naming the "
                                        "first repeated line).")
    synthetic_users: int = _opt(100, "Synthetic data: number of users.")
    synthetic_items: int = _opt(400, "Synthetic data: number of items.")
    synthetic_mean_length: int = _opt(40, "Synthetic data: mean interactions per user.")
    synthetic_clusters: int = _opt(8, "Synthetic data: number of taste clusters.")
    cloud_fraction: float = _opt(0.2, "Share of users whose histories the cloud holds (teacher + proxy set).")
    users_per_client: int = _opt(1, "Edge users per client (1 = one device per user).")
    max_len: int = _opt(50, "History length fed to every model (most recent items).")
    _section("teacher")  # --- the cloud's model -------------------------------------------
    teacher_kind: str = _opt("sasrec", "Teacher architecture: sasrec | meanpool.")
    teacher_dim: int = _opt(64, "Teacher width.")
    teacher_blocks: int = _opt(2, "Teacher transformer blocks.")
    teacher_heads: int = _opt(2, "Teacher attention heads.")
    teacher_dropout: float = _opt(0.3, "Teacher dropout.")
    teacher_epochs: int = _opt(40, "Teacher maximum epochs (early stopping on cloud validation NDCG@10).")
    teacher_patience: int = _opt(4, "Teacher early-stopping patience in epochs.")
    teacher_lr: float = _opt(0.001, "Teacher Adam learning rate.")
    teacher_weight_decay: float = _opt(0.0, "Teacher weight decay.")
    teacher_batch_size: int = _opt(128, "Teacher batch size.")
    teacher_max_seconds: float = _opt(900.0, "Wall-clock cap on teacher training (0 = none).")
    _section("student")  # --- the edge's model --------------------------------------------
    student_kind: str = _opt("sasrec", "Student architecture: sasrec | meanpool.")
    student_dim: int = _opt(16, "Student width (the item table dominates its size).")
    student_blocks: int = _opt(1, "Student transformer blocks.")
    student_heads: int = _opt(1, "Student attention heads.")
    student_dropout: float = _opt(0.2, "Student dropout.")
    _section("protocol")  # ----------------------------------------------------------------
    protocol: str = _opt("params", "What crosses the wire each round. params: quantised student updates, "
                                   "averaged (kd-weight 0 = FedAvg); logits: clients keep their models and "
                                   "upload top-k predictions on the proxy set (FedMD/DS-FL); local: no "
                                   "exchange, each client trains alone; proxy: no client trains, the server "
                                   "distils the teacher into the student on the proxy set only.")
    fd_teacher_weight: float = _opt(0.5, "logits protocol: share of the teacher in the distillation targets; "
                                         "the rest is the fleet's averaged predictions (0 = DS-FL, no teacher).")
    teacher_refine_steps: int = _opt(0, "Server steps per round distilling the fleet's predictions on the "
                                        "proxy batch into the teacher (FedDF-style; 0 = frozen teacher).")
    teacher_refine_lr: float = _opt(0.0001, "Adam learning rate of teacher refinement.")
    server_distill_steps: int = _opt(50, "proxy protocol: server distillation steps per round.")
    server_distill_lr: float = _opt(0.001, "proxy protocol: Adam learning rate of the server's student.")
    _section("rounds")  # ------------------------------------------------------------------
    num_rounds: int = _opt(10, "Federated rounds.")
    clients_per_round: int = _opt(0, "Clients sampled per training round (0 = every client).")
    local_optimizer: str = _opt("sgd", "Client optimiser: sgd (stable under averaging) | adam (fresh state each round).")
    local_lr: float = _opt(3.0, "Client learning rate (SGD on a full-softmax loss needs a large one).")
    local_clip_norm: float = _opt(1.0, "Clip each local step's gradient norm to this (0 = no clipping).")
    batch_size: int = _opt(32, "Private samples per local step.")
    server_lr: float = _opt(0.1, "Server step size on the round's mean update: Flower's eta (fedavg, fedadam, "
                                 "fedyogi, fedadagrad) or server_learning_rate (fedavgm); 1 with fedavg = FedAvg.")
    server_optimizer: str = _opt("fedyogi", "What the server does with the round's mean update (Flower's "
                                           "strategies, Reddi et al. 2021): fedavg | fedavgm | fedadam | "
                                           "fedyogi | fedadagrad (docs/convergence.md).")
    server_momentum: float = _opt(0.0, "fedavgm: server momentum (Flower's server_momentum).")
    server_beta_1: float = _opt(0.9, "fedadam, fedyogi: first-moment decay (Flower's beta_1).")
    server_beta_2: float = _opt(0.99, "fedadam, fedyogi: second-moment decay (Flower's beta_2).")
    server_tau: float = _opt(0.001, "fedadam, fedyogi, fedadagrad: adaptivity tau (Flower's tau).")
    server_lr_schedule: str = _opt("cosine", "Server learning rate over the run: constant | cosine (from "
                                               "server-lr in round 1 to server-lr x server-lr-final in the "
                                               "last) | step (x server-lr-final from the second half on).")
    server_lr_final: float = _opt(0.05, "server-lr-schedule cosine or step: the final factor on server-lr.")
    round_timeout: float = _opt(0.0, "Seconds the server waits for replies in a round (0 = no limit).")
    handshake_timeout: float = _opt(0.0, "Seconds the server waits for the nodes' handshake replies; a node "
                                         "that has not answered by then (e.g. a device out of memory) is refused "
                                         "(rejections.jsonl, reason timeout) and the run goes on without it "
                                         "(0 = wait for every node).")
    handshake: str = _opt("ask", "How the server learns which node holds which partition: ask (every node "
                                 "answers a handshake message) | registration-order (simulation only: the i-th "
                                 "node the engine registered holds partition i, checked on handshake-verify "
                                 "nodes, which are asked; one wrong answer and every node is asked). Each "
                                 "message costs the simulation ~5 ms, 9 minutes at 100,000 nodes "
                                 "(docs/performance.md). With secure-aggregation every node is asked (its key).")
    handshake_verify: int = _opt(100, "handshake registration-order: how many nodes, drawn with the seed, are asked "
                                      "to confirm the partition their registration order implies.")
    reply_poll_interval: float = _opt(0.1, "Seconds between the server's checks for replies while it waits on "
                                           "the Deployment Engine (Flower's own: 3 s; the simulation's grid checks "
                                           "every 0.1 s by itself); no result depends on it (docs/devices.md).")
    exchange_window: int = _opt(0, "Messages one exchange (handshake, training, evaluation) keeps in flight at "
                                   "once: the next go out as replies come in; 0 = all at once. Flower's in-memory "
                                   "state checks every message in flight at every pull, so sending a large "
                                   "fleet's messages at once costs time quadratic in the fleet; a few thousand "
                                   "keeps the workers busy at a cost per message that does not grow "
                                   "(docs/performance.md). round-timeout and handshake-timeout then bound the "
                                   "whole exchange. No result depends on it.")
    eval_every: int = _opt(1, "Validate through the clients every this many rounds (and at the last).")
    eval_k: int = _opt(10, "Cut-off k of HR@k and NDCG@k (full ranking, history masked).")
    test_rounds: str = _opt("", "Extra comma-separated rounds after which the best-so-far model is also tested "
                                "(for equal-rounds comparisons inside one longer run).")
    val_clients: int = _opt(0, "Validate on this many clients each round, the same ones every round (drawn "
                               "from the seed); 0 = every client. The test always uses every client.")
    val_smoothing: int = _opt(1, "Choose the model on the mean of this many consecutive validations (the "
                                 "newest of them is kept), so one lucky evaluation does not pick it; 1 = the "
                                 "best single validation.")
    stop_patience: int = _opt(0, "Stop when this many validations in a row did not beat the chosen one "
                                 "(plateau stop; 0 = run every round).")
    target_ndcg: float = _opt(0.0, "Validation NDCG@k target: the first round that reaches it (with its bytes "
                                   "and simulated time) goes into summary.json (0 = none).")
    stop_at_target: bool = _opt(False, "Stop once validation reaches target-ndcg.")
    _section("fleet")  # --- device tiers (compute budget in local steps per round) --------
    tier_names: str = _opt("weak,strong", "Comma-separated device tier names.")
    tier_shares: str = _opt("0.5,0.5", "Share of clients in each tier (sums to 1).")
    tier_steps: str = _opt("4,16", "Local steps per round each tier can afford.")
    # --- device profiles, deadlines, heterogeneous students (docs/budgets.md) -----------------
    tier_speed: str = _opt("1", "Relative compute speed per tier, or one value for all (1 = the calibrated machine).")
    tier_memory_mb: str = _opt("64", "Memory per tier (MB) a device lends to training; it picks the "
                                        "widest student of student-widths whose training footprint fits.")
    tier_uplink_kbps: str = _opt("10000", "Uplink bandwidth per tier (kbit/s).")
    tier_downlink_kbps: str = _opt("50000", "Downlink bandwidth per tier (kbit/s).")
    tier_availability: str = _opt("1", "Probability per tier that a device is online in a round.")
    device_spread: float = _opt(0.0, "Per-device lognormal spread (sigma) around its tier's speed, memory "
                                     "and bandwidths (0 = every device exactly its tier).")
    device_trace: str = _opt("", "CSV/JSON trace with one profile per client (overrides the tier-* "
                                 "profile values; format in docs/budgets.md).")
    calibration: str = _opt("", "Calibration JSON from `fedkd calibrate` giving seconds per local step by "
                                "student width (empty = the one shipped for the reference machine).")
    round_deadline: float = _opt(0.0, "Simulated seconds per round for download + local steps + upload; a "
                                      "device fits as many steps as the deadline allows (0 = no deadline).")
    straggler_policy: str = _opt("drop", "drop: a device that cannot fit min-steps is a straggler and its "
                                         "work is not used; partial: it sends the steps that fit.")
    min_steps: int = _opt(1, "Fewest local steps that count as finishing a round under a deadline.")
    student_widths: str = _opt("", "Nested student widths (HeteroFL), e.g. '4,8,16'; each device trains "
                                   "the widest slice its memory holds (empty = everyone trains student-dim).")
    selection: str = _opt("uniform", "uniform: clients-per-round drawn uniformly from the online devices; "
                                     "budget: prefer devices likely to finish, never starving a tier.")
    _section("distillation")  # ------------------------------------------------------------
    kd_weight: float = _opt(1.0, "lambda: weight of the distillation loss (0 = plain federated training).")
    kd_schedule: str = _opt("gate", "Distillation weight over rounds: constant (kd-weight) | linear (to 0 "
                                        "at kd-decay-rounds) | exp (halved every kd-decay-rounds) | gate "
                                        "(kd-weight until the student, scored on the cloud users' validation "
                                        "items, passes the teacher there; then 0 for good).")
    kd_decay_rounds: int = _opt(20, "kd-schedule linear: rounds to reach 0; exp: half-life in rounds.")
    kd_temperature: float = _opt(2.0, "Softmax temperature T of teacher and student in the KD loss.")
    kd_top_k: int = _opt(20, "Teacher items per proxy sample sent as soft labels (the rest is one bin).")
    kd_batch_size: int = _opt(32, "Proxy samples per local step.")
    proxy_size: int = _opt(2048, "Public proxy set: prefixes drawn from cloud users' training histories.")
    proxy_batch: int = _opt(64, "Proxy samples (with soft labels) sent to each client per round.")
    warm_start_steps: int = _opt(0, "Before round 1 the server distils the teacher into the global student for "
                                    "this many Adam steps (server-distill-lr, kd-batch-size) on the proxy set: "
                                    "no messages, cloud data only (0 = off; params protocol with kd-weight > 0: "
                                    "kd-weight 0, plain FedAvg, has no warm start).")
    warm_start_cloud: bool = _opt(False, "The warm start also fits the cloud users' own training samples "
                                         "(next-item CE, teacher-batch-size per step), as the teacher did.")
    _section("wire")  # --------------------------------------------------------------------
    quant_bits: int = _opt(8, "Bits per value of the student (down) and updates (up): 2, 4, 8 or 32 (identity).")
    quant_stochastic: bool = _opt(True, "Stochastic (unbiased) rounding of uploads; downloads round to nearest.")
    soft_label_bits: int = _opt(8, "Bits per soft-label probability: 2, 4, 8 or 32.")
    # --- communication (docs/communication.md) -------------------------------------------
    down_bits: int = _opt(0, "Bits per value of the student sent down: 2, 4, 8 or 32 (0 = quant-bits, "
                             "which then sets both directions).")
    quant_scales: str = _opt("tensor", "One scale and offset per tensor, or per row (first axis) of each "
                                       "tensor: tensor | row (8 more bytes a row, less error for rows "
                                       "of different ranges).")
    error_feedback: bool = _opt(False, "Each client adds the quantisation error it left out last time to "
                                       "its next update (kept in a device-local file, not in Flower's "
                                       "node state).")
    update_density: float = _opt(1.0, "Share of update entries sent, largest magnitudes first (top-k "
                                      "sparsification; 1 = dense).")
    soft_label_format: str = _opt("topk", "topk: top kd-top-k ids + quantised probabilities per proxy row; "
                                          "full: float32 distribution over every item (the naive baseline).")
    kd_cache: bool = _opt(False, "Clients keep the proxy histories and soft labels they received; the "
                                 "server resends only rows a client lacks or whose labels changed.")
    wire_payloads: bool = _opt(False, "Also save every message's arrays and scalars under wire/ in the results "
                                      "folder, beside wire.jsonl (for audits; large).")
    _section("privacy")  # --- docs/privacy.md ---------------------------------------------
    dp_mode: str = _opt("off", "Client-level differential privacy (protocol params). central: the server clips "
                               "each decoded update to dp-clip-norm and adds Gaussian noise to their sum, clients "
                               "are Poisson-sampled at rate clients-per-round / clients; local: each device clips "
                               "and noises its own update before quantisation; distributed (needs "
                               "secure-aggregation): each device clips, rounds onto the secure sum's grid and adds "
                               "its share of discrete Gaussian noise, so the server only ever sees the noisy sum "
                               "(Poisson-sampled as central); off: none.")
    dp_clip_norm: float = _opt(1.0, "L2 norm C every client update is clipped to (dp-mode central, local or "
                                    "distributed).")
    dp_noise_multiplier: float = _opt(0.0, "Noise standard deviation as a multiple of dp-clip-norm. 0 with "
                                           "dp-target-epsilon > 0: calibrated so that num-rounds rounds end at "
                                           "the target; 0 without a target: clipping only (epsilon = inf).")
    dp_target_epsilon: float = _opt(0.0, "Privacy budget at dp-delta: a round that would exceed it is refused "
                                         "and training stops there (0 = no budget).")
    dp_delta: float = _opt(1e-05, "delta at which the accountant reports epsilon.")
    dp_local_participations: int = _opt(0, "dp-mode local: the most rounds one device takes part in. Its noise "
                                           "is calibrated so that this many noisy updates end at "
                                           "dp-target-epsilon, and a device that has sent this many sits out: "
                                           "the server stops picking it and the device itself refuses (local DP "
                                           "trusts no one). 0 = num-rounds: calibrated for a device picked in "
                                           "every round, which a sampled device never is (docs/privacy.md).")
    dp_secure_rng: bool = _opt(False, "Draw DP randomness (local and distributed DP's noise on the devices; "
                                      "central DP's noise, Poisson sampling and the adaptive clip's noisy count on "
                                      "the server) from "
                                      "the operating system's cryptographically secure generator instead of the "
                                      "seeded streams: the noise can then not be recomputed from the seed, and "
                                      "runs no longer repeat (docs/privacy.md).")
    dp_clip_adaptive: bool = _opt(False, "dp-mode central or distributed: adapt the clipping norm each round "
                                         "towards the dp-clip-quantile quantile of the update norms (Andrew et al. "
                                         "2021, as Flower's DifferentialPrivacyServerSideAdaptiveClipping), starting "
                                         "at dp-clip-norm; the private count it needs is part of the accounted "
                                         "release (distributed: one more noised coordinate of the secure sum). Not "
                                         "with central DP under secure-aggregation.")
    dp_clip_quantile: float = _opt(0.5, "dp-clip-adaptive: target quantile of the update norms, i.e. the share "
                                        "of updates left unclipped (the paper's gamma).")
    dp_clip_lr: float = _opt(0.2, "dp-clip-adaptive: learning rate of the geometric clip update "
                                  "C <- C exp(-lr (unclipped share - quantile)).")
    dp_clip_count_stddev: float = _opt(0.0, "dp-clip-adaptive: standard deviation of the noise on the count of "
                                            "unclipped updates (0 = expected clients per round / 20, the paper's "
                                            "and Flower's default).")
    secure_aggregation: bool = _opt(False, "protocol params: SecAgg+-style secure aggregation (fedkd.secagg): "
                                           "devices mask their quantised updates with pairwise and self masks whose "
                                           "seeds are Shamir-shared among the round's devices, so the server learns "
                                           "only the survivors' sum, also when devices drop after sharing (down to "
                                           "the threshold). Costs two extra round trips per round; uploads are "
                                           "quant-bits (at most 16) plus log2(devices) bits per value "
                                           "(error-feedback and update-density < 1 are refused).")
    secagg_threshold: float = _opt(0.5, "Secure aggregation: fraction t/n of the round's n devices whose shares "
                                        "rebuild a secret; the round survives up to n - t dropouts after sharing "
                                        "and is refused, with its reason logged, below t.")
    secagg_shares: int = _opt(0, "Secure aggregation: SecAgg+'s neighbour graph (Bell et al. 2020, as Flower's "
                                 "SecAggPlusWorkflow num_shares): each device masks with, and Shamir-shares its "
                                 "seeds among, this many devices of the round, itself included (odd: its "
                                 "neighbours on a ring in an order the server draws each round), so keys, "
                                 "shares and unmask answers cost this many peers instead of all the round's "
                                 "devices; secagg-threshold then applies to each neighbourhood. 0, or at "
                                 "least the round's devices: every device (SecAgg's complete graph).")
    secagg_group_size: int = _opt(0, "Secure aggregation: split each round's devices into groups of at most "
                                     "this many (at least 2 each, drawn each round) and run one secure sum per "
                                     "group; the server adds the groups' sums, so it learns each group's sum "
                                     "instead of only the round's. Why: the ring a masked value needs grows with "
                                     "the devices summed (16 bits for 150 devices at 8 bits, 12 for 16), and "
                                     "keys and shares grow with them too, so groups of 16 keep 8-bit masked "
                                     "uploads within 1.5x of plain ones. A group below its threshold is refused "
                                     "alone. 0: one secure sum over the round.")
    secagg_range: float = _opt(1.0, "Secure aggregation: first round's clipping range of every tensor on the "
                                    "shared quantisation grid; later rounds use the survivors' mean peak |update| "
                                    "of each tensor, learnt only as a sum (under dp-mode central or "
                                    "distributed: fixed at dp-clip-norm instead).")
    membership_attack: bool = _opt(True, "After the run, a loss-threshold membership-inference attack on the "
                                         "chosen global student; its AUC goes into summary.json.")
    reconstruction_attack: bool = _opt(True, "protocol params: each round, the server ranks items by how much "
                                             "their embedding rows change in each client's update (under "
                                             "secure-aggregation: in the round's sum) and guesses the training "
                                             "history; precision/recall and a popularity baseline go into "
                                             "summary.json (reconstruction_attack).")

    _section("faults")  # --- injected by the ClientApp (docs/reliability.md) --------------
    fault_crash: float = _opt(0.0, "Probability that a selected client crashes (raises) instead of replying to a "
                                   "train message; drawn per client per round from the seed.")
    fault_hang: float = _opt(0.0, "Probability that a selected client hangs (sleeps round-timeout + 2 s) before "
                                  "replying to a train message, so the server stops waiting; needs round-timeout > 0.")
    fault_corrupt: float = _opt(0.0, "Probability that a selected client sends a corrupt train reply, of a kind "
                                     "drawn from fault-corrupt-kinds.")
    fault_corrupt_kinds: str = _opt(",".join(("nan", "inf", "shape", "dtype", "missing-key", "oversized",
                                              "undecodable", "steps")),
                                    "Corruptions a corrupt reply draws from: nan, inf, shape, dtype, missing-key, "
                                    "oversized, undecodable, steps.")
    fault_malicious: str = _opt("", "Comma-separated partition ids of malicious clients: each sends its update "
                                    "multiplied by fault-malicious-scale (a well-formed lie; params protocol).")
    fault_malicious_scale: float = _opt(100.0, "Factor a malicious client scales its update by (100: a boosted "
                                               "update, as in model-replacement attacks).")
    _section("defences")  # --- reliability: what the server does about bad replies --------
    max_reply_bytes: int = _opt(0, "Largest serialised train reply accepted, in bytes (0 = twice the train "
                                   "message it answers plus 64 kB).")
    min_replies: int = _opt(1, "Fewest valid train replies a round needs to change the model; with fewer the "
                               "round is skipped (model unchanged, `skipped` = 1 in metrics.csv).")
    aggregation: str = _opt("mean", "mean: example-weighted mean (FedAvg); trimmed-mean: per coordinate, drop "
                                    "the trim-fraction lowest and highest client values, weighted mean of the rest.")
    trim_fraction: float = _opt(0.1, "trimmed-mean: share of the round's clients dropped at each end, per "
                                     "coordinate, in [0, 0.5).")
    norm_bound: float = _opt(0.0, "Scale each update down to at most this multiple of the round's median "
                                  "update L2 norm before aggregating (norm bounding; 0 = off, else >= 1).")
    norm_reject: float = _opt(0.0, "Reject (reason 'norm') an update whose L2 norm exceeds this multiple of the "
                                   "round's median update norm (0 = off, else >= 1).")
    _section("experiment")  # --- again: a resume continues in the results folder ----------
    resume: bool = _opt(False, "Continue the run in <output-dir>/<experiment-name> after its last complete "
                               "round, from the checkpoint written every round (`fedkd run --resume`).")

    # Not an option: the list-valued options parsed into tuples, set once in __post_init__
    # (outside run_config, to_flat, the help and equality).
    lists: ListOptions = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lists", _parse_lists(self))
        _validate(self)

    # --- conversions ------------------------------------------------------------------
    @classmethod
    def from_flat(cls, flat: Mapping[str, Scalar]) -> ExperimentConfig:
        """Parse a kebab-case mapping (Flower's run_config); unknown keys and wrong types fail."""
        known = {f.name: f for f in _options()}
        kwargs: dict[str, Any] = {}
        for key, value in flat.items():
            name = key.replace("-", "_")
            if name not in known:
                close = [k for k in cls.keys() if k.split("-")[0] == key.split("-")[0]]
                hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
                raise ValueError(f"Unknown config key '{key}'.{hint} See `fedkd run --help`.")
            kwargs[name] = _coerce(key, value, type(known[name].default))
        return cls(**kwargs)

    def to_flat(self) -> dict[str, Scalar]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in _options()}

    def replace(self, **overrides: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **overrides)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in _options()]

    @classmethod
    def help_table(cls, section: str | None = None) -> list[tuple[str, Scalar, str]]:
        """(key, default, help) of every option, or of one section's."""
        return [(f.name.replace("_", "-"), f.default, f.metadata["help"]) for f in _options()
                if section is None or f.metadata["section"] == section]

    @classmethod
    def sections(cls) -> dict[str, list[str]]:
        """Section name -> its keys, sections in :data:`SECTIONS` order, keys in declaration order."""
        out: dict[str, list[str]] = {name: [] for name in SECTIONS}
        for f in _options():
            out[f.metadata["section"]].append(f.name.replace("_", "-"))
        return out

    @classmethod
    def section_of(cls, key: str) -> str:
        """The section of a (kebab-case) key."""
        for f in _options():
            if f.name == key.replace("-", "_"):
                return f.metadata["section"]
        raise KeyError(f"unknown config key {key!r}")

    def section(self, name: str) -> Section:
        """One section of this config: its keys and run-config values, and typed attribute access."""
        if name not in SECTIONS:
            raise KeyError(f"unknown config section {name!r}; sections: {', '.join(SECTIONS)}")
        names = [f.name for f in _options() if f.metadata["section"] == name]
        typed = {n: getattr(self.lists, n) if n in _LIST_NAMES else getattr(self, n) for n in names}
        return Section(name, SECTIONS[name], {n.replace("_", "-"): getattr(self, n) for n in names}, typed)

    def to_json(self) -> str:
        return json.dumps(self.to_flat(), indent=2, sort_keys=True)

    # --- typed views ------------------------------------------------------------------
    def teacher_model(self, num_items: int) -> ModelConfig:
        from fedkd.models import ModelConfig
        return ModelConfig(kind=self.teacher_kind, num_items=num_items, dim=self.teacher_dim,
                           blocks=self.teacher_blocks, heads=self.teacher_heads,
                           max_len=self.max_len, dropout=self.teacher_dropout)

    def student_model(self, num_items: int) -> ModelConfig:
        from fedkd.models import ModelConfig
        return ModelConfig(kind=self.student_kind, num_items=num_items, dim=self.student_dim,
                           blocks=self.student_blocks, heads=self.student_heads,
                           max_len=self.max_len, dropout=self.student_dropout)

    def teacher_train(self) -> TrainConfig:
        from fedkd.train import TrainConfig
        return TrainConfig(epochs=self.teacher_epochs, batch_size=self.teacher_batch_size,
                           lr=self.teacher_lr, weight_decay=self.teacher_weight_decay,
                           patience=self.teacher_patience,
                           max_seconds=self.teacher_max_seconds or None, seed=self.seed)

    @property
    def stateful_clients(self) -> bool:
        """Clients keep their own model between rounds (nothing global to send them)."""
        return self.protocol in ("logits", "local")

    @property
    def needs_teacher(self) -> bool:
        if self.teacher_refine_steps > 0:
            return True
        if self.kd_weight == 0:
            return False
        return self.protocol != "logits" or self.fd_teacher_weight > 0

    @property
    def warms_up(self) -> bool:
        """The server warm-starts the global student: a distillation step, so only where the
        students distil (kd-weight > 0) and there is a global student (params)."""
        return self.warm_start_steps > 0 and self.kd_weight > 0 and self.protocol == "params"

    @property
    def needs_proxy(self) -> bool:
        return self.needs_teacher or self.protocol == "logits"

    @property
    def student_bits(self) -> int:
        """Bits of the student on the way down (down-bits, or quant-bits when it is 0)."""
        return self.down_bits or self.quant_bits

    @property
    def per_row(self) -> bool:
        return self.quant_scales == "row"

    @property
    def tiers(self) -> list[tuple[str, float, int]]:
        """(name, share, steps) per device tier."""
        return list(zip(self.lists.tier_names, self.lists.tier_shares, self.lists.tier_steps))

    @property
    def widths(self) -> list[int]:
        """Nested student widths, narrowest first; [student-dim] when the fleet is homogeneous."""
        return list(self.lists.student_widths) or [self.student_dim]

    @property
    def extra_test_rounds(self) -> set[int]:
        return set(self.lists.test_rounds)

    @property
    def column_map(self) -> dict[str, str] | None:
        return dict(self.lists.data_columns) if self.data_columns else None


_opening[0] = ""  # the class body is done: a stray _opt outside it has no section


def _options() -> tuple[dataclasses.Field, ...]:
    """The options (the fields with a help text): everything in run_config, in declaration order."""
    return _OPTIONS


_OPTIONS = tuple(f for f in dataclasses.fields(ExperimentConfig) if "help" in f.metadata)
if not all(f.metadata["section"] in SECTIONS for f in _OPTIONS):
    raise RuntimeError("an option of ExperimentConfig is declared before any _section(...) line")


# --------------------------------------------------------------------------- comparing runs' settings
# The synthetic generator's knobs: what they say is unused when the interactions come from a file.
SYNTHETIC_KEYS = ("synthetic-users", "synthetic-items", "synthetic-mean-length", "synthetic-clusters")


def settings_differ(stored: Mapping[str, Scalar], expected: Mapping[str, Scalar]) -> list[str]:
    """The keys in which a run's recorded settings (``stored``: config.json, a checkpoint) and the
    settings asked for now (``expected``) differ in what the run computes; [] when they are the same run.

    Why not plain equality: a knob added to fedkd later, at the value that keeps the earlier
    behaviour, does not change what an older run did (a key missing from ``stored`` means what
    fedkd did before it existed: ``ABSENT_MEANS``, else its default), and a default changed later
    for a knob the run never used (the synthetic data's size, 300 users until 2026-12-01, under a
    ``data-path``) does not either. Either would otherwise make every finished run stale and every
    checkpoint unresumable. Any other difference counts.
    """
    defaults = ExperimentConfig().to_flat()
    before = {**defaults, **ABSENT_MEANS}
    keys = set(stored) | set(expected)
    was = {k: stored.get(k, before.get(k)) for k in keys}
    now = {k: expected.get(k, defaults.get(k)) for k in keys}
    unused = set(SYNTHETIC_KEYS) if was.get("data-path") and now.get("data-path") else set()
    return sorted(k for k in keys if k not in unused and was[k] != now[k])


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Section(Mapping[str, Scalar]):
    """One section of a config (``cfg.section("privacy")``).

    A read-only mapping of its kebab-case keys to their run-config values (what ``to_flat``
    has for them); attribute access gives the typed values code reads, the list-valued
    options as the tuples of :class:`ListOptions` (``cfg.section("fleet").tier_steps == (4, 16)``).
    """

    name: str
    about: str
    flat: Mapping[str, Scalar]
    typed: Mapping[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Scalar:
        return self.flat[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.flat)

    def __len__(self) -> int:
        return len(self.flat)

    def __getattr__(self, name: str) -> Any:  # only for names that are not the dataclass's own
        typed = self.__dict__.get("typed", {})
        if name in typed:
            return typed[name]
        raise AttributeError(f"config section {self.__dict__.get('name')!r} has no option {name!r}")


# --------------------------------------------------------------------------- list-valued options
@dataclass(frozen=True)
class ListOptions:
    """The list-valued options as tuples, parsed once when the config is built (``cfg.lists``).

    The options themselves stay the comma-separated strings of the run config, so ``to_flat``,
    config.json and Flower's run_config hold exactly what was given; code reads these tuples.
    A value that does not parse is refused naming its option (:func:`_parse_lists`).
    """

    data_columns: tuple[tuple[str, str], ...]  # (role, column) pairs, in the order given
    test_rounds: tuple[int, ...]
    tier_names: tuple[str, ...]
    tier_shares: tuple[float, ...]
    tier_steps: tuple[int, ...]
    tier_speed: tuple[float, ...]  # one value (every tier) or one per tier, as given
    tier_memory_mb: tuple[float, ...]
    tier_uplink_kbps: tuple[float, ...]
    tier_downlink_kbps: tuple[float, ...]
    tier_availability: tuple[float, ...]
    student_widths: tuple[int, ...]
    fault_corrupt_kinds: tuple[str, ...]
    fault_malicious: tuple[int, ...]


_LIST_NAMES = frozenset(f.name for f in dataclasses.fields(ListOptions))
TIER_PROFILE_KEYS = ("tier-speed", "tier-memory-mb", "tier-uplink-kbps", "tier-downlink-kbps", "tier-availability")
FAULT_KINDS = ("nan", "inf", "shape", "dtype", "missing-key", "oversized", "undecodable", "steps")
SERVER_PROTOCOLS = ("params", "proxy")  # the model lives on the server: a checkpoint holds all of it

# What each list-valued option allows, said alike when its value does not parse and when a rule refuses it.
COLUMNS_ALLOWED = "'user=COL,item=COL,timestamp=COL' (any subset)"
SHARES_ALLOWED = "non-negative numbers that sum to 1"
STEPS_ALLOWED = "positive integers"
MALICIOUS_ALLOWED = "distinct comma-separated partition ids (integers >= 0)"
KINDS_ALLOWED = "distinct comma-separated names from " + ", ".join(FAULT_KINDS)


def _test_rounds_allowed(c: ExperimentConfig) -> str:
    return f"comma-separated rounds in 1..num-rounds ({c.num_rounds})"


def _widths_allowed(c: ExperimentConfig) -> str:
    return f"increasing widths that divide by student-heads and end at student-dim ({c.student_dim})"


def _per_tier_allowed(key: str, tiers: int) -> str:
    return (f"1 number (every tier) or {tiers} comma-separated numbers (one per tier), "
            + ("each in [0, 1]" if key == "tier-availability" else "each > 0"))


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _natural(token: str) -> int:
    """A non-negative integer written in ASCII digits only (no sign, no '_', no '4.0')."""
    if not (token.isascii() and token.isdigit()):
        raise ValueError(token)
    return int(token)


def _column_pair(token: str) -> tuple[str, str]:
    if "=" not in token:
        raise ValueError(token)
    role, column = token.split("=", 1)
    return role, column


def _items(c: ExperimentConfig, key: str, item: Callable[[str], Any], allowed: str) -> tuple:
    """The comma-separated value of ``key`` as a tuple of ``item``s, or the error that names ``key``."""
    raw = getattr(c, key.replace("-", "_"))
    try:
        return tuple(item(t) for t in _split(raw))
    except ValueError:
        pass  # refused below, outside the handler: the traceback shows one error, not two
    _check(False, key, raw, allowed)
    raise AssertionError("unreachable")


def _parse_lists(c: ExperimentConfig) -> ListOptions:
    """Every list-valued option as a tuple, in declaration order; the first that does not parse is refused."""
    columns = _items(c, "data-columns", _column_pair, COLUMNS_ALLOWED)
    test_rounds = _items(c, "test-rounds", _natural, _test_rounds_allowed(c))
    names = tuple(_split(c.tier_names))
    shares = _items(c, "tier-shares", float, SHARES_ALLOWED)
    steps = _items(c, "tier-steps", _natural, STEPS_ALLOWED)
    profile = {key.replace("-", "_"): _items(c, key, float, _per_tier_allowed(key, len(names)))
               for key in TIER_PROFILE_KEYS}
    widths = _items(c, "student-widths", _natural, _widths_allowed(c))
    kinds = tuple(_split(c.fault_corrupt_kinds))
    malicious = _items(c, "fault-malicious", _natural, MALICIOUS_ALLOWED)
    return ListOptions(data_columns=columns, test_rounds=test_rounds, tier_names=names, tier_shares=shares,
                       tier_steps=steps, **profile, student_widths=widths, fault_corrupt_kinds=kinds,
                       fault_malicious=malicious)


# --------------------------------------------------------------------------- parsing scalars
def _coerce(key: str, value: Any, kind: type) -> Scalar:
    """Accept what TOML or a command line produce; refuse silent truncation or type mix-ups."""
    if isinstance(value, (list, tuple, dict)):  # a TOML array or table: never str() it into a value
        hint = " (write a list as one comma-separated string, e.g. '4,8,16')" if isinstance(value, (list, tuple)) else ""
        raise ValueError(f"Config key '{key}' must be a single value, got {value!r}{hint}.")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ValueError(f"Config key '{key}' must be true or false, got {value!r}.")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"Config key '{key}' must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"Config key '{key}' must be an integer, got {value!r}.")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"Config key '{key}' must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Config key '{key}' must be a number, got {value!r}.") from None
    return str(value)


# --------------------------------------------------------------------------- validation
def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Config key '{key}' has invalid value {value!r}: allowed {allowed}.")


def _at_least(c: ExperimentConfig, names: tuple[str, ...], low: int) -> None:
    for name in names:
        _check(getattr(c, name) >= low, name.replace("_", "-"), getattr(c, name), f"an integer >= {low}")


def _finite(c: ExperimentConfig, names: tuple[str, ...], *, positive: bool) -> None:
    for name in names:
        v = getattr(c, name)
        _check(math.isfinite(v) and (v > 0 if positive else v >= 0), name.replace("_", "-"), v,
               "a finite number > 0" if positive else "a finite number >= 0")


def _validate(c: ExperimentConfig) -> None:
    """Each section's own rules, in section order, then the rules across sections."""
    for name in SECTIONS:
        SECTION_RULES[name](c)
    _rules_across(c)


def _rules_experiment(c: ExperimentConfig) -> None:
    _check(bool(c.experiment_name) and "/" not in c.experiment_name and c.experiment_name not in {".", ".."},
           "experiment-name", c.experiment_name, "a non-empty folder name without '/'")
    _check(c.seed >= 0, "seed", c.seed, "an integer >= 0")


def _rules_data(c: ExperimentConfig) -> None:
    _at_least(c, ("synthetic_users", "synthetic_items", "synthetic_mean_length", "synthetic_clusters",
                  "users_per_client", "max_len"), 1)
    _check(0 <= c.cloud_fraction < 1, "cloud-fraction", c.cloud_fraction, "a number in [0, 1)")
    _check(c.data_min_interactions >= 3, "data-min-interactions", c.data_min_interactions,
           "an integer >= 3 (leave-one-out needs train, validation and test items)")
    _check(c.data_format in {"auto", "ml-100k", "ml-csv", "csv", "tsv", "parquet"}, "data-format",
           c.data_format, "auto, ml-100k, ml-csv, csv, tsv or parquet")
    _check(c.data_duplicates in {"drop", "keep", "error"}, "data-duplicates", c.data_duplicates,
           "drop, keep or error")
    _check({role.strip() for role, _ in c.lists.data_columns} <= {"user", "item", "timestamp"}, "data-columns",
           c.data_columns, COLUMNS_ALLOWED)


def _rules_teacher(c: ExperimentConfig) -> None:
    _at_least(c, ("teacher_dim", "teacher_blocks", "teacher_heads", "teacher_epochs", "teacher_batch_size"), 1)
    _at_least(c, ("teacher_patience",), 0)
    _finite(c, ("teacher_lr",), positive=True)
    _finite(c, ("teacher_weight_decay", "teacher_max_seconds"), positive=False)
    _check(0 <= c.teacher_dropout < 1, "teacher-dropout", c.teacher_dropout, "a number in [0, 1)")
    _check(c.teacher_kind in {"sasrec", "meanpool"}, "teacher-kind", c.teacher_kind, "sasrec or meanpool")
    _check(c.teacher_dim % c.teacher_heads == 0, "teacher-dim", c.teacher_dim,
           f"a multiple of teacher-heads ({c.teacher_heads})")


def _rules_student(c: ExperimentConfig) -> None:
    _at_least(c, ("student_dim", "student_blocks", "student_heads"), 1)
    _check(0 <= c.student_dropout < 1, "student-dropout", c.student_dropout, "a number in [0, 1)")
    _check(c.student_kind in {"sasrec", "meanpool"}, "student-kind", c.student_kind, "sasrec or meanpool")
    _check(c.student_dim % c.student_heads == 0, "student-dim", c.student_dim,
           f"a multiple of student-heads ({c.student_heads})")


def _rules_protocol(c: ExperimentConfig) -> None:
    _at_least(c, ("teacher_refine_steps", "server_distill_steps"), 0)
    _finite(c, ("teacher_refine_lr", "server_distill_lr"), positive=True)
    _check(c.protocol in {"params", "logits", "local", "proxy"}, "protocol", c.protocol,
           "params, logits, local or proxy")
    _check(0 <= c.fd_teacher_weight <= 1, "fd-teacher-weight", c.fd_teacher_weight, "a number in [0, 1]")
    _check(c.teacher_refine_steps == 0 or c.protocol in {"params", "logits"}, "teacher-refine-steps",
           c.teacher_refine_steps, f"0 with protocol = {c.protocol} (refinement needs the fleet's predictions)")


def _rules_rounds(c: ExperimentConfig) -> None:
    _at_least(c, ("num_rounds", "batch_size", "eval_every", "eval_k", "val_smoothing"), 1)
    _at_least(c, ("clients_per_round", "val_clients", "stop_patience", "exchange_window", "handshake_verify"), 0)
    _check(c.handshake in {"ask", "registration-order"}, "handshake", c.handshake, "ask or registration-order")
    _finite(c, ("local_lr", "server_lr"), positive=True)
    _finite(c, ("round_timeout", "handshake_timeout", "local_clip_norm"), positive=False)
    _check(0 < c.reply_poll_interval <= 60, "reply-poll-interval", c.reply_poll_interval, "a number in (0, 60]")
    _check(c.local_optimizer in {"sgd", "adam"}, "local-optimizer", c.local_optimizer, "sgd or adam")
    _check(c.server_optimizer in {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}, "server-optimizer",
           c.server_optimizer, "fedavg, fedavgm, fedadam, fedyogi or fedadagrad")
    for name in ("server_momentum", "server_beta_1", "server_beta_2"):
        v = getattr(c, name)
        _check(0 <= v < 1, name.replace("_", "-"), v, "a number in [0, 1)")
    _check(math.isfinite(c.server_tau) and c.server_tau > 0, "server-tau", c.server_tau, "a finite number > 0")
    _check(c.server_lr_schedule in {"constant", "cosine", "step"}, "server-lr-schedule", c.server_lr_schedule,
           "constant, cosine or step")
    _check(math.isfinite(c.server_lr_final) and 0 <= c.server_lr_final <= 1, "server-lr-final",
           c.server_lr_final, "a number in [0, 1]")
    _check(math.isfinite(c.target_ndcg) and 0 <= c.target_ndcg <= 1, "target-ndcg", c.target_ndcg,
           "a number in [0, 1] (0 = none)")
    _check(not c.stop_at_target or c.target_ndcg > 0, "stop-at-target", c.stop_at_target,
           "false unless target-ndcg > 0")
    _check(all(1 <= t <= c.num_rounds for t in c.lists.test_rounds), "test-rounds", c.test_rounds,
           _test_rounds_allowed(c))


def _rules_fleet(c: ExperimentConfig) -> None:
    lists = c.lists
    names, shares, steps = lists.tier_names, lists.tier_shares, lists.tier_steps
    _check(len(names) >= 1 and len(set(names)) == len(names), "tier-names", c.tier_names,
           "one or more distinct comma-separated names")
    _check(len(shares) == len(names), "tier-shares", c.tier_shares,
           f"{len(names)} comma-separated numbers, one per tier in tier-names")
    _check(len(steps) == len(names), "tier-steps", c.tier_steps,
           f"{len(names)} comma-separated integers, one per tier in tier-names")
    _check(all(s >= 0 for s in shares) and abs(sum(shares) - 1) < 1e-6, "tier-shares", c.tier_shares,
           SHARES_ALLOWED)
    _check(all(s >= 1 for s in steps), "tier-steps", c.tier_steps, STEPS_ALLOWED)
    for key in TIER_PROFILE_KEYS:
        values = getattr(lists, key.replace("-", "_"))
        each = (lambda v: 0 <= v <= 1) if key == "tier-availability" else (lambda v: math.isfinite(v) and v > 0)
        _check(len(values) in (1, len(names)) and all(each(v) for v in values), key,
               getattr(c, key.replace("-", "_")), _per_tier_allowed(key, len(names)))
    _check(math.isfinite(c.device_spread) and c.device_spread >= 0, "device-spread", c.device_spread,
           "a finite number >= 0")
    _check(math.isfinite(c.round_deadline) and c.round_deadline >= 0, "round-deadline", c.round_deadline,
           "a finite number >= 0 (0 = no deadline)")
    _check(c.straggler_policy in {"drop", "partial"}, "straggler-policy", c.straggler_policy, "drop or partial")
    _check(c.min_steps >= 1, "min-steps", c.min_steps, "an integer >= 1")
    _check(c.selection in {"uniform", "budget"}, "selection", c.selection, "uniform or budget")


def _rules_distillation(c: ExperimentConfig) -> None:
    _at_least(c, ("kd_top_k", "kd_batch_size", "proxy_size", "proxy_batch", "kd_decay_rounds"), 1)
    _finite(c, ("kd_temperature",), positive=True)
    _finite(c, ("kd_weight",), positive=False)
    _check(c.kd_schedule in {"constant", "linear", "exp", "gate"}, "kd-schedule", c.kd_schedule,
           "constant, linear, exp or gate")
    _check(c.proxy_batch <= c.proxy_size, "proxy-batch", c.proxy_batch, f"at most proxy-size ({c.proxy_size})")
    _check(c.warm_start_steps >= 0, "warm-start-steps", c.warm_start_steps, "an integer >= 0")


def _rules_wire(c: ExperimentConfig) -> None:
    for name in ("quant_bits", "soft_label_bits"):
        _check(getattr(c, name) in {2, 4, 8, 32}, name.replace("_", "-"), getattr(c, name), "2, 4, 8 or 32")
    _check(c.down_bits in {0, 2, 4, 8, 32}, "down-bits", c.down_bits, "0 (= quant-bits), 2, 4, 8 or 32")
    _check(c.quant_scales in {"tensor", "row"}, "quant-scales", c.quant_scales, "tensor or row")
    _check(math.isfinite(c.update_density) and 0 < c.update_density <= 1, "update-density", c.update_density,
           "a number in (0, 1] (1 = every entry)")
    _check(c.soft_label_format in {"topk", "full"}, "soft-label-format", c.soft_label_format, "topk or full")


def _rules_privacy(c: ExperimentConfig) -> None:
    _check(c.dp_mode in {"off", "central", "local", "distributed"}, "dp-mode", c.dp_mode,
           "off, central, local or distributed")
    _check(math.isfinite(c.dp_clip_norm) and c.dp_clip_norm > 0, "dp-clip-norm", c.dp_clip_norm,
           "a finite number > 0")
    _finite(c, ("dp_noise_multiplier", "dp_target_epsilon"), positive=False)
    _check(0 < c.dp_delta < 1, "dp-delta", c.dp_delta, "a number in (0, 1)")
    _check(c.dp_local_participations >= 0, "dp-local-participations", c.dp_local_participations,
           "an integer >= 0 (0 = num-rounds)")


def _rules_faults(c: ExperimentConfig) -> None:
    for name in ("fault_crash", "fault_hang", "fault_corrupt"):
        v = getattr(c, name)
        _check(0 <= v <= 1, name.replace("_", "-"), v, "a probability in [0, 1]")
    total = c.fault_crash + c.fault_hang + c.fault_corrupt
    _check(total <= 1 + 1e-12, "fault-corrupt", c.fault_corrupt,
           f"at most 1 - fault-crash - fault-hang = {1 - c.fault_crash - c.fault_hang:g} (one fault per reply)")
    kinds = c.lists.fault_corrupt_kinds
    _check(bool(kinds) and set(kinds) <= set(FAULT_KINDS) and len(set(kinds)) == len(kinds),
           "fault-corrupt-kinds", c.fault_corrupt_kinds, KINDS_ALLOWED)
    ids = c.lists.fault_malicious
    _check(len(set(ids)) == len(ids), "fault-malicious", c.fault_malicious, MALICIOUS_ALLOWED)
    _check(math.isfinite(c.fault_malicious_scale), "fault-malicious-scale", c.fault_malicious_scale,
           "a finite number")


def _rules_defences(c: ExperimentConfig) -> None:
    _check(c.max_reply_bytes >= 0, "max-reply-bytes", c.max_reply_bytes, "an integer >= 0 (0 = automatic)")
    _check(c.min_replies >= 1, "min-replies", c.min_replies, "an integer >= 1")
    _check(c.aggregation in {"mean", "trimmed-mean"}, "aggregation", c.aggregation, "mean or trimmed-mean")
    _check(0 <= c.trim_fraction < 0.5, "trim-fraction", c.trim_fraction, "a number in [0, 0.5)")
    for name in ("norm_bound", "norm_reject"):
        v = getattr(c, name)
        _check(math.isfinite(v) and (v == 0 or v >= 1), name.replace("_", "-"), v,
               "0 (off) or a finite multiple of the median norm >= 1")


#: Each section's own rules: its values alone and the combinations inside it (every section has one).
SECTION_RULES: dict[str, Callable[[ExperimentConfig], None]] = {
    "experiment": _rules_experiment, "data": _rules_data, "teacher": _rules_teacher, "student": _rules_student,
    "protocol": _rules_protocol, "rounds": _rules_rounds, "fleet": _rules_fleet,
    "distillation": _rules_distillation, "wire": _rules_wire, "privacy": _rules_privacy,
    "faults": _rules_faults, "defences": _rules_defences,
}
if list(SECTION_RULES) != list(SECTIONS):
    raise RuntimeError("every config section needs its rules function in SECTION_RULES, in section order")


def _rules_across(c: ExperimentConfig) -> None:
    """The combinations that span sections (mostly: what a protocol can do), after every section passed."""
    _check(c.protocol != "proxy" or c.kd_weight > 0, "kd-weight", c.kd_weight,
           "a number > 0 with protocol = proxy (the student learns from the teacher alone)")
    _check(c.protocol != "logits" or c.cloud_fraction > 0, "cloud-fraction", c.cloud_fraction,
           "a number > 0 with protocol = logits (its public proxy set is drawn from cloud users)")
    _check(not c.needs_teacher or c.cloud_fraction > 0, "cloud-fraction", c.cloud_fraction,
           "a number > 0 when a teacher is used (kd-weight > 0 or teacher refinement): it has no data otherwise")
    # server-optimizer, server-lr-schedule and kd-schedule are defaults of every run; a protocol
    # without a global student (or without local distillation) does not use them, and the
    # run's log says so (server/compose.py) instead of refusing the defaults.
    _check(c.val_clients == 0 or not c.stateful_clients, "val-clients", c.val_clients,
           f"0 with protocol = {c.protocol} (its devices score the test split in the validation message, "
           "so every device must answer)")
    _check(not c.error_feedback or c.protocol == "params", "error-feedback", c.error_feedback,
           f"false with protocol = {c.protocol} (only params uploads updates)")
    _check(c.soft_label_format == "topk" or c.protocol in {"params", "local"}, "soft-label-format",
           c.soft_label_format, f"topk with protocol = {c.protocol} (full labels exist only in the train "
           "messages of params and local)")
    _check(not c.kd_cache or (c.protocol in {"params", "local"} and c.soft_label_format == "topk"), "kd-cache",
           c.kd_cache, "false unless protocol is params or local and soft-label-format is topk (the full "
           "format is the uncompressed baseline)")
    if c.dp_mode != "off":
        _check(c.protocol == "params", "dp-mode", c.dp_mode,
               f"off with protocol = {c.protocol} (DP acts on parameter updates)")
        _check(c.teacher_refine_steps == 0, "teacher-refine-steps", c.teacher_refine_steps,
               "0 with dp-mode on (refinement reads single clients' models, which DP does not cover)")
        _check(c.dp_mode not in {"central", "distributed"} or c.selection == "uniform", "selection", c.selection,
               f"uniform with dp-mode = {c.dp_mode} (clients are Poisson-sampled)")
    _check(0 < c.dp_clip_quantile < 1, "dp-clip-quantile", c.dp_clip_quantile, "a number in (0, 1)")
    _check(math.isfinite(c.dp_clip_lr) and c.dp_clip_lr > 0, "dp-clip-lr", c.dp_clip_lr, "a finite number > 0")
    _check(math.isfinite(c.dp_clip_count_stddev) and c.dp_clip_count_stddev >= 0, "dp-clip-count-stddev",
           c.dp_clip_count_stddev, "a finite number >= 0 (0 = expected clients per round / 20)")
    _check(c.dp_local_participations == 0 or c.dp_mode == "local", "dp-local-participations",
           c.dp_local_participations, f"0 with dp-mode = {c.dp_mode} (it caps local DP's devices)")
    _check(not c.dp_secure_rng or c.dp_mode != "off", "dp-secure-rng", c.dp_secure_rng,
           "false with dp-mode = off (there is no DP noise to draw)")
    _check(c.dp_mode != "distributed" or c.secure_aggregation, "dp-mode", c.dp_mode,
           "off, central or local without secure-aggregation (distributed DP adds its noise shares under the "
           "masks of the secure sum: set secure-aggregation = true)")
    if c.dp_clip_adaptive:
        _check(c.dp_mode in {"central", "distributed"}, "dp-clip-adaptive", c.dp_clip_adaptive,
               f"false with dp-mode = {c.dp_mode} (adaptive clipping needs central or distributed DP)")
        _check(c.dp_mode == "distributed" or not c.secure_aggregation, "dp-clip-adaptive", c.dp_clip_adaptive,
               "false with dp-mode = central and secure-aggregation (the devices clip there and the server adds "
               "the noise, so their unclipped bits would go un-noised into the secure sum; dp-mode = "
               "distributed counts them under the masks with the devices' noise)")
    _check(0 < c.secagg_threshold <= 1, "secagg-threshold", c.secagg_threshold, "a fraction in (0, 1]")
    _check(c.secagg_shares == 0 or (c.secagg_shares >= 3 and c.secagg_shares % 2 == 1), "secagg-shares",
           c.secagg_shares, "0 (every device of the round) or an odd number of at least 3")
    _check(c.secagg_group_size == 0 or c.secagg_group_size >= 2, "secagg-group-size", c.secagg_group_size,
           "0 (one secure sum over the round) or at least 2")
    if c.secagg_group_size:
        _check(c.secagg_shares == 0, "secagg-group-size", c.secagg_group_size,
               "0 with secagg-shares (both say whom a device masks with: use one)")
        _check(c.dp_mode != "distributed", "secagg-group-size", c.secagg_group_size,
               "0 with dp-mode = distributed (its noise is calibrated for the round's sum; a group's sum, which "
               "the server would see, holds only the group's share of it)")
    _check(math.isfinite(c.secagg_range) and c.secagg_range > 0, "secagg-range", c.secagg_range,
           "a finite number > 0")
    if c.secure_aggregation:
        _check(c.protocol == "params", "secure-aggregation", c.secure_aggregation,
               f"false with protocol = {c.protocol} (it sums parameter updates)")
        _check(c.teacher_refine_steps == 0, "teacher-refine-steps", c.teacher_refine_steps,
               "0 with secure-aggregation (refinement needs single clients' models)")
        # Masked uploads are codes on a shared grid in an exact modular ring (the masks cancel only
        # there), so the upload codecs do not apply: refused, not silently ignored.
        _check(not c.error_feedback, "error-feedback", c.error_feedback,
               "false with secure-aggregation (masked updates use the shared grid, not the update codec)")
        _check(c.update_density == 1, "update-density", c.update_density,
               "1 with secure-aggregation (a masked update is dense: the masks cover every entry)")
    if c.dp_mode == "central" or c.secure_aggregation:  # those paths sum updates their own way
        _check(c.aggregation == "mean" and c.norm_bound == 0, "aggregation", c.aggregation,
               "mean with norm-bound 0 under dp-mode = central or secure-aggregation (clipping is the bound)")
    # reliability: faults and defences against the rest
    _check(c.fault_hang == 0 or c.round_timeout > 0, "fault-hang", c.fault_hang,
           "0 unless round-timeout > 0 (a hang is noticed only by a server that stops waiting)")
    _check(c.fault_corrupt == 0 or c.protocol in {"params", "logits"}, "fault-corrupt", c.fault_corrupt,
           f"0 with protocol = {c.protocol} (its replies carry no arrays to corrupt)")
    _check(not c.lists.fault_malicious or c.protocol == "params", "fault-malicious", c.fault_malicious,
           f"empty with protocol = {c.protocol} (a malicious client scales a model update)")
    robust = {"aggregation": c.aggregation != "mean", "norm-bound": c.norm_bound > 0, "norm-reject": c.norm_reject > 0}
    for key, on in robust.items():
        _check(not on or c.protocol == "params", key, getattr(c, key.replace("-", "_")),
               f"its default with protocol = {c.protocol} (robust aggregation combines model updates)")
    _check(not c.resume or c.protocol in SERVER_PROTOCOLS, "resume", c.resume,
           f"false with protocol = {c.protocol}: its models live in Flower's node state on the devices, "
           "which a killed simulation loses; resume works with " + " and ".join(SERVER_PROTOCOLS))
    _check(not c.resume or not c.error_feedback, "resume", c.resume,
           "false with error-feedback = true: the devices' residual files may already hold the killed "
           "round's residuals, which a resume cannot roll back")
    ws = c.lists.student_widths
    _check(all(1 <= w <= c.student_dim and w % c.student_heads == 0 for w in ws)
           and (not ws or ws[-1] == c.student_dim) and list(ws) == sorted(ws),
           "student-widths", c.student_widths, _widths_allowed(c))
