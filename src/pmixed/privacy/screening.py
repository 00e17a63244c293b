"""Screened PMixED ("adaptive"): a sparse-vector screen in front of the PMixED release, spent
through a Renyi filter (docs/privacy.md, section 11). Pure math, no torch.

Each query x_t gets a score

    s_t = H(p_0(. | x_t)) + w / (q_s N) * sum_{i in S_r} g_i(x_t),     g_i = min(1, sqrt(a_2(p_i)))  (S1)

(H: the public model's entropy in nats, a function of public data only; a_2 the chi-square
moment of eq. (B2); S_r the round's test subsample, each member with probability q_s, drawn once
per round). The screen is AboveThreshold (Dwork & Roth 2014, Algorithm 1 / Theorem 3.23): a
round draws S_r and rho_r ~ Lap(2 Delta / eps_s); each query of the round draws
nu_t ~ Lap(4 Delta / eps_s) and is *private* iff s_t + nu_t >= theta + rho_r, otherwise it is
answered by p_0 alone (no member runs for it). A private query is answered by the PMixED release
(eq. (M1)) with an independent Poisson draw, and closes the round.

Sensitivity (replace-one-part, and also adding or removing one member from S_r): given S_r, s_t
moves by at most

    Delta = w / (q_s N)                                                                      (S2)

at every query (only the changed member's term, in [0, w / (q_s N)]). With w = 0 the screen is a
fixed public rule (Delta = 0, no noise, no cost).

Cost of one round at integer order a (S_r Poisson at rate q_s; eq. (S3), section 11):

    r = q_s (e^eps_s - 1),    eps_round(a) = min(log(1 + r), log((1 + r)^a - a r) / (a - 1))

A *unit* is one round and its private release, charged when the round opens:
eps_unit(a) = eps_round(a) + eps(a) of eq. (R3). Units are composed by a Renyi filter at one
order fixed in advance (acceptance.RenyiFilterRule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pmixed.errors import ConfigError
from pmixed.privacy.accountant import DEFAULT_ORDERS, RdpCharge, check_orders
from pmixed.privacy.calibration import (
    AUTO_ALPHAS,
    DEFAULT_LAM_MAX,
    DEFAULT_TAIL,
    SAFETY,
    check_alpha,
    check_shape,
    largest_scale,
)
from pmixed.privacy.conversion import check_delta, check_epsilon, rdp_budget
from pmixed.privacy.mixture_bound import params_record, query_rdp
from pmixed.privacy.params import MechanismParams, check_ensemble

#: The ``mechanism`` name of one unit (a screen round + its private release) in a charge.
MECHANISM = "pmixed/adaptive"


def _finite(field: str, x: object, *, ge: float | None = None, gt: float | None = None) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(field, f"must be a finite number, got {x!r}")
    if ge is not None and not x >= ge:
        raise ConfigError(field, f"must be >= {ge:g}, got {x!r}")
    if gt is not None and not x > gt:
        raise ConfigError(field, f"must be > {gt:g}, got {x!r}")
    return float(x)


@dataclass(frozen=True)
class ScreenParams:
    """The screen of eq. (S1): threshold theta (nats), private weight w >= 0, the round's pure
    epsilon eps_s (> 0 when w > 0) and test rate q_s in (0, 1], for an ensemble of N members."""

    ensemble_size: int
    threshold: float
    weight: float = 0.0
    svt_epsilon: float = 0.0
    test_rate: float = 1.0

    def __post_init__(self) -> None:
        check_ensemble(self.ensemble_size, self.test_rate)
        object.__setattr__(self, "threshold", _finite("screen_threshold", self.threshold))
        object.__setattr__(self, "weight", _finite("screen_weight", self.weight, ge=0.0))
        object.__setattr__(self, "svt_epsilon", _finite("screen_epsilon", self.svt_epsilon, ge=0.0))
        object.__setattr__(self, "test_rate", float(self.test_rate))
        if self.weight > 0.0 and not self.svt_epsilon > 0.0:
            raise ConfigError("screen_epsilon", "must be > 0 when screen_weight > 0 (a private score needs noise)")

    @property
    def private(self) -> bool:
        """Whether the score reads the members (w > 0); otherwise the screen is a public rule."""
        return self.weight > 0.0

    @property
    def sensitivity(self) -> float:
        """Delta of eq. (S2)."""
        return self.weight / (self.test_rate * self.ensemble_size) if self.private else 0.0

    @property
    def threshold_scale(self) -> float:
        """The Laplace scale of the round's threshold noise rho_r: 2 Delta / eps_s."""
        return 2.0 * self.sensitivity / self.svt_epsilon if self.private else 0.0

    @property
    def query_scale(self) -> float:
        """The Laplace scale of each query's noise nu_t: 4 Delta / eps_s."""
        return 4.0 * self.sensitivity / self.svt_epsilon if self.private else 0.0

    def record(self) -> dict[str, Any]:
        return {"ensemble_size": self.ensemble_size, "threshold": self.threshold, "weight": self.weight,
                "svt_epsilon": self.svt_epsilon, "test_rate": self.test_rate}


def _integer_order(order: float) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, float)) or math.isnan(order) or not order > 1:
        raise ConfigError("alpha", f"Renyi orders must be numbers > 1, got {order!r}")
    return math.ceil(order)  # D_a is non-decreasing in a (van Erven & Harremoes 2014, Thm 3)


def round_rdp(order: float, screen: ScreenParams) -> float:
    """eps_round(a) of eq. (S3): the RDP of one AboveThreshold round on a Poisson(q_s)
    subsample (0 for a public screen)."""
    a = _integer_order(order)
    if not screen.private:
        return 0.0
    r = screen.test_rate * math.expm1(screen.svt_epsilon)
    if math.isinf(r):
        return math.inf
    pure = math.log1p(r)
    # (1 + r)^a - a r = 1 + sum_{k=2..a} C(a, k) r^k: the excess summed exactly (no cancellation)
    log_r = math.log(r)
    terms = [math.exp(math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + k * log_r)
             for k in range(2, a + 1)]
    expansion = math.log1p(math.fsum(terms)) / (a - 1)
    return min(pure, expansion) * (1.0 + 1e-12)  # rounding of the sums: charge more


@dataclass(frozen=True)
class AdaptiveParams:
    """A screened mechanism: the PMixED release's parameters, the screen, the filter's order
    (fixed in advance) and the number of private answers (units) it was calibrated for."""

    release: MechanismParams
    screen: ScreenParams
    order: int
    private_queries: int

    def __post_init__(self) -> None:
        if self.screen.ensemble_size != self.release.ensemble_size:
            raise ConfigError("screen", "the screen and the release must have the same N")
        if self.order > self.release.max_order:
            raise ConfigError("filter_order", f"must be <= the projection's max order {self.release.max_order}")

    def unit_rdp(self, order: float) -> float:
        """eps_unit(a) = eps_round(a) + eq. (R3) at a: one round and its private release."""
        return round_rdp(order, self.screen) + query_rdp(order, self.release)

    def record(self) -> dict[str, Any]:
        return {"release": params_record(self.release), "screen": self.screen.record(), "order": self.order,
                "private_queries": self.private_queries}


def adaptive_charge(params: AdaptiveParams, count: int = 1, orders: Sequence[float] = DEFAULT_ORDERS,
                    label: str = "") -> RdpCharge:
    """``count`` units (rounds, each with its one private release) as a charge: the curve
    eps_unit at ``orders`` (the filter reads only ``params.order``), recorded as
    "pmixed/adaptive" with everything it was computed from."""
    orders = check_orders(orders)
    return RdpCharge(orders, tuple(params.unit_rdp(a) for a in orders), count, label,
                     mechanism=MECHANISM, params=params.record())


def adaptive_from_record(record: dict[str, Any]) -> AdaptiveParams:
    """The parameters a recorded "pmixed/adaptive" charge was computed from (replay, audits)."""
    rel = record["release"]
    release = MechanismParams(int(rel["ensemble_size"]), float(rel["sample_rate"]), float(rel["lam_max"]),
                              tuple(float(t) for t in rel["radii"]))
    scr = record["screen"]
    screen = ScreenParams(int(scr["ensemble_size"]), float(scr["threshold"]), float(scr["weight"]),
                          float(scr["svt_epsilon"]), float(scr["test_rate"]))
    return AdaptiveParams(release, screen, int(record["order"]), int(record["private_queries"]))


@dataclass(frozen=True)
class AdaptiveCalibration:
    params: AdaptiveParams
    epsilon: float
    delta: float
    rdp_budget: float  # rho at the filter's order

    @property
    def order(self) -> int:
        return self.params.order

    def units_left(self, spent: float) -> int:
        """How many more units fit the filter after ``spent`` RDP at its order."""
        u = self.params.unit_rdp(self.order)
        if u == 0.0:
            return 2**62
        k = max(0, math.floor((self.rdp_budget - spent) / u))
        while k > 0 and spent + k * u > self.rdp_budget:
            k -= 1
        return k


def _release_at(order: int, room: float, units: int, ensemble_size: int, sample_rate: float,
                lam_max: float, tail: float) -> MechanismParams | None:
    """The largest-scale release radii (shape (K1), K = order) with units * eq. (R3) <= room."""
    if room <= 0.0:
        return None
    return largest_scale(order, ensemble_size, sample_rate, lam_max, tail,
                         lambda p: units * query_rdp(order, p) <= room * (1.0 - SAFETY))


def calibrate_adaptive(
    *,
    epsilon: float,
    delta: float,
    private_queries: int,
    ensemble_size: int,
    sample_rate: float,
    screen: ScreenParams,
    alpha: float | None = None,
    lam_max: float = DEFAULT_LAM_MAX,
    tail: float = DEFAULT_TAIL,
) -> AdaptiveCalibration:
    """The screened mechanism whose ``private_queries`` units fit (epsilon, delta) under a Renyi
    filter at one order: alpha if given, else the order in 2..32 giving the largest release
    scale. The order is a function of the configuration only (never of data), fixed before any
    query."""
    check_epsilon(epsilon)
    check_delta(delta)
    check_alpha(alpha)
    if isinstance(private_queries, bool) or not isinstance(private_queries, int) or private_queries < 1:
        raise ConfigError("private_queries", f"must be an integer >= 1, got {private_queries!r}")
    check_ensemble(ensemble_size, sample_rate)
    if screen.ensemble_size != ensemble_size:
        raise ConfigError("screen", "the screen and the release must have the same N")
    check_shape(sample_rate, lam_max, tail)
    best: tuple[float, int, MechanismParams] | None = None
    for a in ([int(alpha)] if alpha is not None else list(AUTO_ALPHAS)):
        rho = rdp_budget(epsilon, delta, a)
        room = rho - private_queries * round_rdp(a, screen)
        rel = _release_at(a, room, private_queries, ensemble_size, sample_rate, lam_max, tail)
        if rel is None:
            continue
        scale = math.sqrt(rel.radii[0])
        if best is None or scale > best[0]:
            best = (scale, a, rel)
    if best is None:
        raise ConfigError("epsilon" if alpha is None else "alpha",
                          f"epsilon={epsilon} at delta={delta} cannot pay for {private_queries} screened private "
                          f"answers (screen rounds included) at {'any order 2..32' if alpha is None else f'order {alpha}'}")
    _, a, rel = best
    params = AdaptiveParams(rel, screen, a, private_queries)
    return AdaptiveCalibration(params, float(epsilon), float(delta), rdp_budget(epsilon, delta, a))
