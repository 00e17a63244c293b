"""Accounted shape tuning: a differentially private choice among PMixED shapes, paid from the
deployment's budget (docs/privacy.md, section 12). Pure math, no torch.

A *trial* picks a candidate shape theta uniformly at random (public randomness), answers one
PMixED query with it at each tuning position (the last m scored positions of one block of each
held-out unit, at most ``positions`` = U m queries), counts the hits (sampled token = the true
next token) and releases (theta, hits + Lap(m / eps_s)). Neighbours (section 12): the data of one
part, or the records of one held-out unit. Then at every integer order a

    eps_trial(a) = max(U m max_theta eps_theta(a),  eps_Lap(a; eps_s))                       (H2)

where eps_theta is eq. (R3) for the candidate's parameters (a part's change: the hits are
post-processing of U m PMixED answers to queries that part does not touch) and

    eps_Lap(a; e) = min(e, log(a/(2a-1) e^((a-1)e) + (a-1)/(2a-1) e^(-a e)) / (a-1))         (H1)

is the RDP of the Laplace mechanism of pure epsilon e (Mironov 2017, Proposition 6; a held-out
unit's change moves the hit count by at most m for every coupling of the other positions' draws
and samples, and the Renyi divergence is jointly quasi-convex).

The tuner runs K trials, K drawn from the truncated negative binomial D_{eta,gamma}
(P[K = k] proportional to (1 - gamma)^k prod_{l<k} (l + eta)/(l + 1), k >= 1; eta = 1 is the
geometric law with mean 1/gamma), and releases the best trial (largest noisy count). Papernot &
Steinke 2022 ("Hyperparameter tuning with Renyi differential privacy", Theorem 2): at every order a
and for every order b >= 1,

    eps_tune(a) = eps_trial(a) + (1 + eta)(1 - 1/b) eps_trial(b) + (1 + eta) log(1/gamma) / b
                  + log E[K] / (a - 1)                                                       (H3)

(the best b over the grid is taken), with E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta)), or
(1/gamma - 1) / log(1/gamma) at eta = 0. The charge is recorded as mechanism "tune/pmixed" with
every parameter it was computed from, and is charged before any trial runs.

The cheaper cap-statistic tuner (``BindParams``, mechanism "tune/bind") releases one number of
sensitivity 1/N computed on public positions, the members' mean share of positions at which the
reference shape's cap binds, with Laplace noise, and sets lam_max from it:

    eps_tune(a) = eps_Lap(a; eps_s)                                                          (H4)
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from pmixed.errors import ConfigError
from pmixed.privacy.accountant import DEFAULT_ORDERS, RdpCharge, check_orders
from pmixed.privacy.mixture_bound import params_from_record, params_record, query_rdp
from pmixed.privacy.params import MechanismParams

#: The ``mechanism`` name of a tuning charge.
MECHANISM = "tune/pmixed"
_MARGIN = 1.0 + 1e-12  # rounding of the closed forms: charge more


def _positive(field: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not x > 0:
        raise ConfigError(field, f"must be a finite number > 0, got {x!r}")
    return float(x)


def _order(order: float) -> float:
    if isinstance(order, bool) or not isinstance(order, (int, float)) or math.isnan(order) or not order > 1:
        raise ConfigError("orders", f"Renyi orders must be numbers > 1, got {order!r}")
    return float(order)


def laplace_rdp(order: float, epsilon: float) -> float:
    """eps_Lap(a; e) of eq. (H1): the Laplace mechanism with scale sensitivity / e at order a."""
    a = _order(order)
    e = _positive("score_epsilon", epsilon)
    if math.isinf(a):
        return e
    # log of the two-term mixture, in log space (no overflow at large a e)
    x1 = math.log(a / (2 * a - 1)) + (a - 1) * e
    x2 = math.log((a - 1) / (2 * a - 1)) - a * e
    m = max(x1, x2)
    value = (m + math.log(math.exp(x1 - m) + math.exp(x2 - m))) / (a - 1)
    return min(e, value * _MARGIN)


def check_trials(eta: float, gamma: float) -> None:
    """The truncated negative binomial's parameters: eta > -1, 0 < gamma < 1."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or not eta > -1:
        raise ConfigError("eta", f"must be a finite number > -1, got {eta!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma < 1.0:
        raise ConfigError("gamma", f"must lie in (0, 1), got {gamma!r}")


def expected_trials(eta: float, gamma: float) -> float:
    """E[K] for K ~ D_{eta,gamma} (the mean in eq. (H3)): eta (1 - gamma) / (gamma (1 - gamma^eta)),
    which is P[K = 1] / gamma^(eta + 1) (at eta = 0 too: (1/gamma - 1) / log(1/gamma))."""
    check_trials(eta, gamma)
    return _first_pmf(eta, gamma) / gamma ** (eta + 1.0)


def _first_pmf(eta: float, gamma: float) -> float:
    d = math.expm1(-eta * math.log(gamma))  # gamma^-eta - 1
    if abs(d) < 1e-200:  # eta = 0 (or so close that the formula underflows): the logarithmic law, its limit
        return (1.0 - gamma) / math.log(1.0 / gamma)
    return (1.0 - gamma) * eta / d


def trials_pmf(k: int, eta: float, gamma: float) -> float:
    """P[K = k] under D_{eta,gamma} (k >= 1): P[K = 1] = (1 - gamma) eta / (gamma^-eta - 1)
    (eta = 0: (1 - gamma) / log(1/gamma)), then P[K = k+1] = P[K = k] (1 - gamma)(k + eta)/(k + 1)."""
    check_trials(eta, gamma)
    if k < 1:
        return 0.0
    log_p = math.log(_first_pmf(eta, gamma)) + (k - 1) * math.log1p(-gamma)
    log_p += math.fsum(math.log((j + eta) / (j + 1)) for j in range(1, k))
    return math.exp(log_p)


def sample_trials(u: float, eta: float, gamma: float, cap: int = 1_000_000) -> int:
    """K ~ D_{eta,gamma} by inversion of the CDF at a uniform ``u`` in [0, 1) (the caller's
    randomness: the OS CSPRNG outside experiments). ``cap`` bounds the loop (P[K > cap] is
    negligible for gamma >= 1e-4: about (1 - gamma)^cap)."""
    check_trials(eta, gamma)
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must lie in [0, 1), got {u!r}")
    p = _first_pmf(eta, gamma)
    acc = p
    k = 1
    while u >= acc and k < cap:
        p *= (1.0 - gamma) * (k + eta) / (k + 1)
        acc += p
        k += 1
    return k


def repeated_rdp(order: float, trial: dict[float, float], eta: float, gamma: float) -> float:
    """eps_tune(a) of eq. (H3) from the trial's curve ``trial`` (order -> eps_trial), the best
    second order b over the curve's orders."""
    a = _order(order)
    check_trials(eta, gamma)
    base = trial.get(a, math.inf)
    if math.isinf(base) or math.isinf(a):
        return math.inf
    extra = math.inf
    for b, eb in trial.items():
        if math.isfinite(b) and math.isfinite(eb):
            extra = min(extra, (1 + eta) * (1 - 1 / b) * eb + (1 + eta) * math.log(1 / gamma) / b)
    if math.isinf(extra):
        return math.inf
    return (base + extra + math.log(expected_trials(eta, gamma)) / (a - 1)) * _MARGIN


def new_run() -> str:
    """A fresh tuning identity: 128 random bits from the OS, as hex. A tuning's charge and its
    tune.json carry it, so that ``pay_tuning`` recognises the charge of that run only."""
    return secrets.token_hex(16)


def _check_run(run: object) -> None:
    if not isinstance(run, str) or not run:
        raise ConfigError("run", f"a tuning's identity must be a non-empty string, got {run!r}")


def _run_of(record: dict[str, Any]) -> dict[str, str]:
    """The recorded run identity as a keyword, none (a fresh one) when the record predates it."""
    return {"run": str(record["run"])} if "run" in record else {}


@dataclass(frozen=True)
class TuneParams:
    """An accounted tuner: the candidates' mechanism parameters (each calibrated for the
    deployment's target), the held-out units U, the scored positions per unit m, the hit count's
    pure epsilon eps_s, and the trial-count law D_{eta,gamma}."""

    candidates: tuple[MechanismParams, ...]
    units: int
    per_unit: int
    score_epsilon: float
    eta: float = 1.0
    gamma: float = 0.1
    run: str = dataclass_field(default_factory=new_run)  # this tuning's identity (``new_run``)

    def __post_init__(self) -> None:
        _check_run(self.run)
        if not self.candidates:
            raise ConfigError("candidates", "at least one shape is needed")
        if len({p.ensemble_size for p in self.candidates}) != 1:
            raise ConfigError("candidates", "every candidate must be for the same ensemble (one N)")
        for field, v in (("units", self.units), ("positions_per_unit", self.per_unit)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field, f"must be an integer >= 1, got {v!r}")
        _positive("score_epsilon", self.score_epsilon)
        check_trials(self.eta, self.gamma)

    @property
    def positions(self) -> int:
        """The most PMixED queries one trial asks (U m): what (H2) charges, whatever the units hold."""
        return self.units * self.per_unit

    def trial_rdp(self, order: float) -> float:
        """eps_trial(a) of eq. (H2)."""
        query = max(query_rdp(order, p) for p in self.candidates)
        return max(self.positions * query, laplace_rdp(order, self.score_epsilon))

    def curve(self, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, ...]:
        """eps_tune at ``orders`` (eq. (H3)), the second order b taken over the same grid."""
        orders = check_orders(orders)
        trial = {a: self.trial_rdp(a) for a in orders}
        return tuple(repeated_rdp(a, trial, self.eta, self.gamma) for a in orders)

    def record(self) -> dict[str, Any]:
        return {"candidates": [params_record(p) for p in self.candidates], "units": self.units,
                "per_unit": self.per_unit, "score_epsilon": self.score_epsilon, "eta": self.eta,
                "gamma": self.gamma, "run": self.run}


def tuning_charge(params: TuneParams, orders: Sequence[float] = DEFAULT_ORDERS, label: str = "tune") -> RdpCharge:
    """The whole tuning as one charge (count 1): eq. (H3) at ``orders``, recorded as "tune/pmixed"."""
    orders = check_orders(orders)
    return RdpCharge(orders, params.curve(orders), 1, label, mechanism=MECHANISM, params=params.record())


def tune_from_record(record: dict[str, Any]) -> TuneParams:
    """The parameters a recorded "tune/pmixed" charge was computed from (replay, audits)."""
    return TuneParams(tuple(params_from_record(c) for c in record["candidates"]), int(record["units"]),
                      int(record["per_unit"]), float(record["score_epsilon"]), float(record["eta"]),
                      float(record["gamma"]), **_run_of(record))


#: The ``mechanism`` name of a cap-statistic tuning charge (eq. (H4)).
BIND_MECHANISM = "tune/bind"
#: The ``mechanism`` name of a tuning's curve pre-charged, without its parameters, to an
#: evaluation's fresh ledger (either tuner; the serving ledgers carry the full record).
SPENT_MECHANISM = "tune/spent"


@dataclass(frozen=True)
class BindParams:
    """The cap-statistic tuner (docs/privacy.md section 12b, eq. (H4)): each member i's share b_i
    in [0, 1] of ``positions`` public positions (sampled from the public model alone) at which its
    mixing weight under the reference shape reaches the reference's cap lam_max (P1); their mean
    over the N members plus Lap(1 / (N eps_s)) is released, B, and lam_max is ``low`` if B <
    ``lower``, ``high`` if B >= ``upper``, else the reference's own (the tail stays the
    reference's). Replacing one part changes one member, hence one b_i, hence the mean by at most
    1/N: the release is eps_s-DP, whose RDP is eq. (H1); the choice is post-processing."""

    ensemble_size: int
    positions: int
    score_epsilon: float
    reference: MechanismParams
    lower: float = 1.0 / 6.0
    upper: float = 0.8
    low: float = 0.25
    high: float = 0.75
    run: str = dataclass_field(default_factory=new_run)  # this tuning's identity (``new_run``)

    def __post_init__(self) -> None:
        _check_run(self.run)
        for field, v in (("ensemble_size", self.ensemble_size), ("public_positions", self.positions)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field, f"must be an integer >= 1, got {v!r}")
        _positive("score_epsilon", self.score_epsilon)
        if self.reference.ensemble_size != self.ensemble_size:
            raise ConfigError("reference", "the reference shape must be for the same ensemble (one N)")
        if not (isinstance(self.lower, (int, float)) and isinstance(self.upper, (int, float))
                and 0.0 < self.lower < self.upper < 1.0):
            raise ConfigError("thresholds", f"need 0 < lower < upper < 1, got {self.lower!r}, {self.upper!r}")
        for field, v in (("low", self.low), ("high", self.high)):
            if not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
                raise ConfigError(field, f"must lie in (0, 1], got {v!r}")

    @property
    def caps(self) -> tuple[float, float, float]:
        """The three lam_max the choice may give: low, the reference's, high."""
        return (self.low, self.reference.lam_max, self.high)

    @property
    def noise_scale(self) -> float:
        """The Laplace scale: sensitivity 1/N over eps_s."""
        return 1.0 / (self.ensemble_size * self.score_epsilon)

    def choose(self, noisy_share: float) -> float:
        """lam_max from the released noisy mean share (post-processing)."""
        if noisy_share >= self.upper:
            return self.high
        return self.low if noisy_share < self.lower else self.reference.lam_max

    def curve(self, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, ...]:
        """eps_tune(a) = eps_Lap(a; eps_s) at ``orders`` (eq. (H4))."""
        return tuple(laplace_rdp(a, self.score_epsilon) for a in check_orders(orders))

    def record(self) -> dict[str, Any]:
        return {"method": "bind", "ensemble_size": self.ensemble_size, "positions": self.positions,
                "score_epsilon": self.score_epsilon, "reference": params_record(self.reference),
                "lower": self.lower, "upper": self.upper, "low": self.low, "high": self.high, "run": self.run}


def bind_charge(params: BindParams, orders: Sequence[float] = DEFAULT_ORDERS, label: str = "tune") -> RdpCharge:
    """The cap-statistic tuning as one charge (count 1): eq. (H4), recorded as "tune/bind"."""
    orders = check_orders(orders)
    return RdpCharge(orders, params.curve(orders), 1, label, mechanism=BIND_MECHANISM, params=params.record())


def bind_from_record(record: dict[str, Any]) -> BindParams:
    """The parameters a recorded "tune/bind" charge was computed from."""
    return BindParams(int(record["ensemble_size"]), int(record["positions"]), float(record["score_epsilon"]),
                      params_from_record(record["reference"]), float(record["lower"]), float(record["upper"]),
                      float(record["low"]), float(record["high"]), **_run_of(record))


def charge_from_record(record: dict[str, Any], orders: Sequence[float] = DEFAULT_ORDERS,
                       label: str = "tune") -> RdpCharge:
    """The charge of either tuner from its recorded parameters (a tune.json's "tuning")."""
    if record.get("method") == "bind":
        return bind_charge(bind_from_record(record), orders, label)
    return tuning_charge(tune_from_record(record), orders, label)


def pay_tuning(budget: Any, record: dict[str, Any], label: str = "tune (charged on first use)") -> bool:
    """Make sure ``budget`` (a Ledger or RdpAccountant) carries the accounted tuning whose
    parameters are ``record`` (a tune.json's "tuning"): True if that very tuning's charge is
    already recorded (``pmixed tune`` charged this ledger: the same tuner, parameters and run
    identity), otherwise it is charged now, before anything is served (BudgetExhausted: refused,
    nothing recorded), and False is returned. A tuning chosen with another ledger, or an
    experiment's in-memory one, is thus paid by the ledger that serves its shape. Equal
    parameters are not enough: two runs of ``pmixed tune`` with the same options are two private
    selections, and serving the second's choice must pay for it even when the first was paid
    here. A record without a run identity (written before it existed) is charged again."""
    from pmixed.privacy.accountant import dump_params

    charge = charge_from_record(record, budget.orders, label=label)
    want = dump_params(charge.params)
    if "run" in record and any(h.mechanism == charge.mechanism and dump_params(h.params) == want
                               for h in budget.history()):
        return True
    budget.charge(charge)
    return False
