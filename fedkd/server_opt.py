"""Server optimizers: what the server does with a round's mean client update.

FedAvg (a plain step), FedAvgM (Hsu et al., 2019) and the adaptive FedOpt family FedAdam,
FedYogi, FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), with the
formulation, parameter names and defaults of Flower 1.41's Message-API strategies:

=========== =====================================================  ==========================
optimizer   follows (``flwr/serverapp/strategy/``)                 parameters (defaults)
=========== =====================================================  ==========================
fedavg      ``fedavg.py`` (the aggregate is the new model)          eta (1.0; fedkd's ``server-lr``)
fedavgm     ``fedavgm.py``, ``FedAvgM.aggregate_train``             server_learning_rate (1.0),
                                                                   server_momentum (0.0)
fedadam     ``fedopt.py`` ``_compute_deltat_and_mt`` + ``fedadam.py``  eta (0.1), eta_l (0.1),
                                                                   beta_1 (0.9), beta_2 (0.99), tau (1e-3)
fedyogi     ``fedopt.py`` + ``fedyogi.py``                          eta (0.01), eta_l (0.0316),
                                                                   beta_1 (0.9), beta_2 (0.99), tau (1e-3)
fedadagrad  ``fedopt.py`` + ``fedadagrad.py``                       eta (0.1), eta_l (0.1), tau (1e-3)
=========== =====================================================  ==========================

Per array, with ``delta`` the round's mean client update (Flower's ``delta_t =
aggregated_arrays - current_arrays``, the pseudo-gradient with the sign of a descent step)::

    FedAvg     x <- x + eta * delta
    FedAvgM    g = -delta; first round: mom = g, later mom = server_momentum * mom + g
               (only when server_momentum > 0, else mom = g);  x <- x - server_learning_rate * mom
    FedOpt     m <- beta_1 * m + (1 - beta_1) * delta            (m starts at 0)
    FedAdam    v <- beta_2 * v + (1 - beta_2) * delta^2          (v starts at 0)
               eta_t = eta * sqrt(1 - beta_2^(t + 1)) / (1 - beta_1^(t + 1)),  t = server round (from 1)
               x <- x + eta_t * m / (sqrt(v) + tau)
    FedYogi    v <- v - (1 - beta_2) * delta^2 * sign(v - delta^2)   (v starts at 0, as in Flower)
               x <- x + eta * m / (sqrt(v) + tau)
    FedAdagrad m = delta (beta_1 = 0); v <- v + delta^2;  x <- x + eta * m / (sqrt(v) + tau)

Flower's quirks are kept on purpose so that a run here and a run of Flower's strategy agree:
FedAdam's bias correction uses the exponent ``server_round + 1`` (rounds count from 1, so the
first round already uses ``t + 1 = 2``); FedYogi's second moment starts at zero, not at
``tau**2`` as in the paper; FedAvgM's momentum buffer starts at the first pseudo-gradient,
without dampening (PyTorch's SGD convention). ``eta_l`` is the client learning rate; Flower
stores it and never uses it in the server update, and neither does this module (fedkd's
clients take theirs from ``local-lr``); it is kept so that the parameter sets match.

Why not call Flower's strategies: their update lives inside ``aggregate_train``, which
takes the replies as Flower ``Message``s each holding exactly one float ``ArrayRecord`` of
full model weights and averages them itself (``configure_train`` also records the current
arrays and samples nodes). fedkd's server aggregates itself before any server optimizer
can act: replies are quantised (and possibly sparse) *updates* to be validated and decoded,
nested HeteroFL slices of different widths, robustly combined (trimmed mean, norm bounds),
clipped and noised (central DP), or known only as a secure-aggregation sum. What reaches the
server optimizer is therefore one mean update, not a list of messages; the few lines of
arithmetic above are reimplemented here on plain ``dict[str, np.ndarray]`` so the module
stays free of Flower imports (like the rest of ``fedkd/``), and ``tests/test_server_opt.py``
checks it against Flower's own ``aggregate_train`` on the same numbers.

Arithmetic is in float64; moments are kept in float64 and the returned state in each
array's own dtype. Coordinates no client touched this round (a nested slice nobody trained)
get ``delta = 0``: their moments decay and, for the adaptive optimizers, a non-zero ``m``
still moves them, as it would in Flower given the same aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["ServerOptimizer", "FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad",
           "OPTIMIZERS", "LR_SCHEDULES", "lr_scale", "make_server_optimizer"]

Arrays = dict[str, np.ndarray]


def _f64(arrays: Mapping[str, np.ndarray]) -> Arrays:
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


class ServerOptimizer:
    """Base class: ``step(state, mean_update) -> new state``; ``state_dict`` for checkpoints."""

    name = "base"
    defaults: dict[str, float] = {}

    def __init__(self, **params: float) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; "
                             f"allowed: {sorted(self.defaults)}")
        self.params = {**self.defaults, **{k: float(v) for k, v in params.items()}}
        for k, v in self.params.items():
            if not np.isfinite(v):
                raise ValueError(f"{self.name}: {k} must be finite, got {v!r}")
        self._check()
        self.round = 0  # steps taken = the last server round
        self.scale = 1.0  # this step's learning-rate factor (see step)

    def __getattr__(self, key: str) -> float:  # opt.eta, opt.beta_1, ...
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(key)

    def _check(self) -> None:
        for k in ("beta_1", "beta_2", "server_momentum"):
            if k in self.params and not 0.0 <= self.params[k] < 1.0:
                raise ValueError(f"{self.name}: {k} must be in [0, 1), got {self.params[k]}")
        if "tau" in self.params and self.params["tau"] <= 0:
            raise ValueError(f"{self.name}: tau must be > 0, got {self.params['tau']}")

    # -- the update ---------------------------------------------------------------------
    def step(self, state: Mapping[str, np.ndarray], mean_update: Mapping[str, np.ndarray], *,
             server_round: int | None = None, scale: float = 1.0) -> Arrays:
        """The new global state after one round whose mean client update is ``mean_update``.

        ``server_round`` (Flower counts from 1) matters only to FedAdam's bias correction;
        by default it is one more than the last step's. ``scale`` multiplies the server
        learning rate (``eta`` or ``server_learning_rate``) for this step only: a schedule
        over rounds (:func:`lr_scale`) that leaves the optimizer's parameters and moments as
        Flower's strategies define them.
        """
        self.scale = float(scale)
        if set(state) != set(mean_update):
            raise ValueError(f"{self.name}: update keys {sorted(mean_update)} do not match state keys "
                             f"{sorted(state)}")
        for k in state:
            if np.shape(state[k]) != np.shape(mean_update[k]):
                raise ValueError(f"{self.name}: update '{k}' has shape {np.shape(mean_update[k])}, "
                                 f"state {np.shape(state[k])}")
        t = self.round + 1 if server_round is None else int(server_round)
        new = self._step(_f64(state), _f64(mean_update), t)
        self.round = t
        return {k: new[k].astype(np.asarray(state[k]).dtype, copy=False) for k in state}

    def _step(self, x: Arrays, delta: Arrays, t: int) -> Arrays:
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------
    _buffers: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        """Name, parameters, round and buffers (copies), plain Python/numpy: picklable."""
        out = {"name": self.name, "params": dict(self.params), "round": self.round}
        for b in self._buffers:
            buf = getattr(self, b)
            out[b] = None if buf is None else {k: v.copy() for k, v in buf.items()}
        return out

    def load_state_dict(self, sd: Mapping) -> None:
        if sd.get("name") != self.name:
            raise ValueError(f"state of optimizer {sd.get('name')!r} cannot load into {self.name!r}")
        if dict(sd["params"]) != self.params:
            raise ValueError(f"{self.name}: saved parameters {dict(sd['params'])} differ from {self.params}")
        self.round = int(sd["round"])
        for b in self._buffers:
            buf = sd.get(b)
            setattr(self, b, None if buf is None else {k: np.array(v, dtype=np.float64) for k, v in buf.items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v:g}' for k, v in self.params.items())})"


class FedAvg(ServerOptimizer):
    """``x + eta * delta``; with ``eta = 1`` the aggregate itself (Flower's FedAvg)."""

    name = "fedavg"
    defaults = {"eta": 1.0}

    def _step(self, x, delta, t):
        return {k: x[k] + self.scale * self.eta * delta[k] for k in x}


class FedAvgM(ServerOptimizer):
    """Server momentum as in Flower's ``FedAvgM.aggregate_train``."""

    name = "fedavgm"
    defaults = {"server_learning_rate": 1.0, "server_momentum": 0.0}
    _buffers = ("momentum_vector",)

    def __init__(self, **params: float) -> None:
        super().__init__(**params)
        self.momentum_vector: Arrays | None = None

    def _step(self, x, delta, t):
        g = {k: -d for k, d in delta.items()}  # "updates are the opposite of gradients"
        if self.server_momentum > 0.0:
            if self.momentum_vector is None:
                self.momentum_vector = {k: v.copy() for k, v in g.items()}
            else:
                self.momentum_vector = {k: self.server_momentum * self.momentum_vector[k] + g[k] for k in g}
            g = self.momentum_vector
        return {k: x[k] - self.scale * self.server_learning_rate * g[k] for k in x}


class _FedOpt(ServerOptimizer):
    """Shared first moment of Flower's ``FedOpt._compute_deltat_and_mt``."""

    _buffers = ("m_t", "v_t")

    def __init__(self, **params: float) -> None:
        super().__init__(**params)
        self.m_t: Arrays | None = None
        self.v_t: Arrays | None = None

    def _moments(self, delta: Arrays) -> Arrays:
        b1 = self.params.get("beta_1", 0.0)
        if self.m_t is None:
            self.m_t = {k: np.zeros_like(v) for k, v in delta.items()}
        self.m_t = {k: b1 * self.m_t[k] + (1 - b1) * delta[k] for k in delta}
        if self.v_t is None:
            self.v_t = {k: np.zeros_like(v) for k, v in delta.items()}
        return self.m_t


class FedAdam(_FedOpt):
    name = "fedadam"
    defaults = {"eta": 0.1, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def _step(self, x, delta, t):
        m = self._moments(delta)
        b2 = self.beta_2
        self.v_t = {k: b2 * self.v_t[k] + (1 - b2) * delta[k] ** 2 for k in delta}
        eta_norm = self.scale * self.eta * np.sqrt(1 - b2 ** (t + 1.0)) / (1 - self.beta_1 ** (t + 1.0))
        return {k: x[k] + eta_norm * m[k] / (np.sqrt(self.v_t[k]) + self.tau) for k in x}


class FedYogi(_FedOpt):
    name = "fedyogi"
    defaults = {"eta": 0.01, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def _step(self, x, delta, t):
        m = self._moments(delta)
        b2 = self.beta_2
        self.v_t = {k: v - (1.0 - b2) * delta[k] ** 2 * np.sign(v - delta[k] ** 2) for k, v in self.v_t.items()}
        return {k: x[k] + self.scale * self.eta * m[k] / (np.sqrt(self.v_t[k]) + self.tau) for k in x}


class FedAdagrad(_FedOpt):
    name = "fedadagrad"
    defaults = {"eta": 0.1, "eta_l": 0.1, "tau": 1e-3}

    def _step(self, x, delta, t):
        m = self._moments(delta)  # beta_1 = 0: m = delta
        self.v_t = {k: v + delta[k] ** 2 for k, v in self.v_t.items()}
        return {k: x[k] + self.scale * self.eta * m[k] / (np.sqrt(self.v_t[k]) + self.tau) for k in x}


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    c.name: c for c in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)}


LR_SCHEDULES = ("constant", "cosine", "step")


def lr_scale(schedule: str, r: int, *, num_rounds: int, final: float) -> float:
    """Factor on the server learning rate in round ``r`` (from 1) of ``num_rounds``.

    A constant adaptive server step keeps the student hopping around its optimum: on
    MovieLens-100K validation swings by about 0.01 between rounds once FedYogi at eta 0.1 has
    plateaued (docs/convergence.md). ``cosine`` anneals from 1 in round 1 to ``final`` in the
    last round; ``step`` holds 1 for the first half and ``final`` after.
    """
    if schedule == "constant" or num_rounds <= 1:
        return 1.0
    frac = min(max((r - 1) / (num_rounds - 1), 0.0), 1.0)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + np.cos(np.pi * frac))
    if schedule == "step":
        return 1.0 if frac < 0.5 else final
    raise ValueError(f"unknown server learning-rate schedule {schedule!r}; choose one of {LR_SCHEDULES}")


def make_server_optimizer(name: str, **params: float) -> ServerOptimizer:
    """``make_server_optimizer("fedadam", eta=0.01, tau=1e-3)``; names are case-insensitive."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key](**params)
