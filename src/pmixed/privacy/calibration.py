"""Calibration: from a target (epsilon, delta, T, N, q[, alpha]) to the mechanism's parameters,
and the inverse (how many queries fit a budget). docs/privacy.md, section 5.

The radii follow one shape, that of a Gaussian with a tail factor s >= 1 (eq. (K1)):

    tau_k = t**k * E|Z|**k * s**(k-2),   Z ~ N(0, 1),   k = 2..alpha,

so with s = 1, (B2) reads "lam_i * (p_i/p_0 - 1) has its k-th absolute moment under p_0 no larger
than a N(0, t^2) variable's"; s > 1 gives the higher orders (whose coefficients in (R3) are
smaller, c^k) more room, for the heavy tails of language-model ratios. The shape is a public
constant (never fitted to private data). The scale t is the largest for which T queries, composed additively
(Mironov 2017, Proposition 1), stay within epsilon at the best order (eq. (C1)); it is found by
bisection that keeps the feasible end. With ``alpha=None`` the order 3..32 giving the largest t
is chosen. The order alpha is also the largest order the projection enforces (K = alpha).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pmixed.errors import ConfigError
from pmixed.privacy.conversion import (
    check_delta,
    check_epsilon,
    epsilon_at_order,
    rdp_budget,
    rdp_to_epsilon,
)
from pmixed.privacy.mixture_bound import query_rdp
from pmixed.privacy.params import MechanismParams, check_ensemble

# The default rule for a shape left unset in a config (docs/privacy.md section 6; README
# "Defaults"): constants, so they read no data. Chosen by benchmarks/default_rule.py as the shape
# with the best mean share of each corpus's best over the shipped corpora (SOTU per speech, per
# president, mail per sender; epsilon 8, T 1024), docs/examples/default-rule/loco.md. Until then
# the defaults were lam_max 0.75, tail 1, which kept 53% / 23% / 25% of the gain there against
# 50% / 33% / 51% for this rule.
DEFAULT_LAM_MAX = 0.5
DEFAULT_TAIL = 10.0
AUTO_ALPHAS = range(2, 33)
SAFETY = 1e-12  # relative margin kept below the target epsilon against rounding


def gaussian_abs_moment(k: int) -> float:
    """E|Z|^k for Z ~ N(0, 1): 2^(k/2) Gamma((k+1)/2) / sqrt(pi)."""
    return math.exp(0.5 * k * math.log(2.0) + math.lgamma((k + 1) / 2.0) - 0.5 * math.log(math.pi))


def radii_for_scale(alpha: int, scale: float, tail: float = 1.0) -> tuple[float, ...]:
    """tau_k = scale^k E|Z|^k tail^(k-2) for k = 2..alpha (eq. (K1))."""
    return tuple(scale**k * gaussian_abs_moment(k) * tail ** (k - 2) for k in range(2, alpha + 1))


def check_queries(queries: int, field: str = "queries") -> None:
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ConfigError(field, f"must be an integer >= 1, got {queries!r}")


def check_alpha(alpha: float | None) -> None:
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or math.isnan(alpha):
        raise ConfigError("alpha", f"must be a number > 1, got {alpha!r}")
    if not alpha > 1.0:
        raise ConfigError("alpha", f"must be > 1, got {alpha!r}")
    if alpha != int(alpha):
        raise ConfigError("alpha", f"must be an integer order (the bound is stated at integers), got {alpha!r}")


@dataclass(frozen=True)
class Calibration:
    params: MechanismParams
    alpha: int  # the order at which the target is met (K = params.max_order may be larger)
    epsilon: float
    delta: float
    query_budget: int
    rdp_budget: float  # rho at alpha for all T queries
    per_query_rdp: float  # charged RDP per query at alpha

    def epsilon_after(self, queries: int) -> float:
        return epsilon_after(self.params, queries, self.delta)


def largest_scale(alpha: int, ensemble_size: int, sample_rate: float, lam_max: float, tail: float,
                  fits) -> MechanismParams | None:
    """The radii of shape (K1) up to order alpha with the largest scale t for which ``fits(params)``
    holds (bisection on log t that keeps the feasible end), or None if none does."""

    def make(scale: float) -> MechanismParams:
        return MechanismParams(ensemble_size, sample_rate, lam_max, radii_for_scale(alpha, scale, tail))

    lo, hi = 1e-9, 1e3
    if not fits(make(lo)):
        return None
    if fits(make(hi)):
        return make(hi)
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fits(make(mid)) else (lo, mid)
    return make(lo)


def check_shape(sample_rate: float, lam_max: float, tail: float) -> None:
    """The shape's own checks (ConfigError naming the field)."""
    if not (isinstance(lam_max, (int, float)) and 0.0 < lam_max <= 1.0):
        raise ConfigError("lam_max", f"must lie in (0, 1], got {lam_max!r}")
    if not (isinstance(tail, (int, float)) and math.isfinite(tail) and tail >= 1.0):
        raise ConfigError("tail", f"must be a number >= 1, got {tail!r}")
    if sample_rate >= 1.0 and lam_max >= 1.0:
        raise ConfigError("lam_max", "must be < 1 when sample_rate is 1 (the bound needs a floor of p_0)")


def _params_at(alpha: int, epsilon, delta, queries, ensemble_size, sample_rate, lam_max, tail=1.0, spent=None):
    """The largest-scale radii at order alpha that meet epsilon after ``queries`` queries; on top
    of ``spent`` (order -> RDP already charged: an accounted tuning), at order alpha itself, the
    order of the Renyi filter that serves a tuned shape (section 12), not the best order."""
    if rdp_budget(epsilon, delta, alpha) <= 0.0:
        return None
    if spent is None:
        return largest_scale(alpha, ensemble_size, sample_rate, lam_max, tail,
                             lambda p: epsilon_after(p, queries, delta) <= epsilon * (1.0 - SAFETY))
    room = rdp_budget(epsilon, delta, alpha) - _spent_at(spent, alpha)
    return largest_scale(alpha, ensemble_size, sample_rate, lam_max, tail,
                         lambda p: queries * query_rdp(alpha, p) <= room * (1.0 - SAFETY))


def scale_of(params: MechanismParams) -> float:
    """t such that tau_2 = t^2 E|Z|^2 (the Gaussian-shape scale of eq. (K1))."""
    return math.sqrt(params.radii[0] / gaussian_abs_moment(2))


def calibrate(
    *,
    epsilon: float,
    delta: float,
    query_budget: int,
    ensemble_size: int,
    sample_rate: float,
    alpha: float | None = None,
    lam_max: float = DEFAULT_LAM_MAX,
    tail: float = DEFAULT_TAIL,
    spent: Mapping[float, float] | None = None,
) -> Calibration:
    """Mechanism parameters meeting (epsilon, delta) after ``query_budget`` queries.

    With ``alpha=None`` the order in 2..64 that gives the largest tau_2 (the main radius) is
    chosen. ``spent`` (order -> RDP already charged to the same budget, e.g. an accounted tuning,
    section 12; an order it does not list counts as inf) is composed with the T queries at the
    order alpha itself (the served shape then depends on the tuning's output, so its budget is a
    Renyi filter at one order, and the T queries must fit there): the target then holds for
    everything together, and ``Calibration.alpha`` is that order. Raises ConfigError naming the
    field when the target cannot be met.
    """
    check_epsilon(epsilon)
    check_delta(delta)
    check_queries(query_budget, "query_budget")
    check_ensemble(ensemble_size, sample_rate)
    check_alpha(alpha)
    check_shape(sample_rate, lam_max, tail)
    candidates = [int(alpha)] if alpha is not None else list(AUTO_ALPHAS)
    best: MechanismParams | None = None
    for a in candidates:
        params = _params_at(a, epsilon, delta, query_budget, ensemble_size, sample_rate, lam_max, tail, spent)
        if params is not None and (best is None or scale_of(params) > scale_of(best)):
            best = params
    if best is None:
        field = "alpha" if alpha is not None else "epsilon"
        where = f"order {alpha}" if alpha is not None else "any order 2..32"
        raise ConfigError(field, f"epsilon={epsilon} at delta={delta} cannot be met at {where}")
    params = best
    orders = tracked_orders(params)
    rdp = [_spent_at(spent, a) + query_budget * query_rdp(a, params) for a in orders]
    eps, best_order = rdp_to_epsilon(orders, rdp, delta)
    a = int(best_order) if spent is None else params.max_order  # spent: the filter's order
    rho = rdp_budget(epsilon, delta, a) - _spent_at(spent, a)
    return Calibration(
        params=params,
        alpha=a,
        epsilon=float(epsilon),
        delta=float(delta),
        query_budget=query_budget,
        rdp_budget=rho,
        per_query_rdp=query_rdp(a, params),
    )


def tracked_orders(params: MechanismParams) -> list[int]:
    """The integer orders with a claim: 2..max_order."""
    return list(range(2, params.max_order + 1))


def _spent_at(spent: Mapping[float, float] | None, order: float) -> float:
    return 0.0 if spent is None else spent.get(float(order), math.inf)


def epsilon_after(params: MechanismParams, queries: int, delta: float,
                  spent: Mapping[float, float] | None = None) -> float:
    """Epsilon at ``delta`` after ``queries`` queries (on top of ``spent``, order -> RDP, when
    given), best over the claimed orders."""
    check_delta(delta)
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 0:
        raise ConfigError("queries", f"must be an integer >= 0, got {queries!r}")
    if queries == 0 and spent is None:
        return 0.0
    orders = tracked_orders(params)
    rdp = [_spent_at(spent, a) + queries * query_rdp(a, params) for a in orders]
    return rdp_to_epsilon(orders, rdp, delta)[0]


def max_queries(params: MechanismParams, epsilon: float, delta: float) -> int:
    """The largest T with epsilon_after(params, T, delta) <= epsilon."""
    check_epsilon(epsilon)
    check_delta(delta)
    best = 0
    for a in tracked_orders(params):
        r = query_rdp(a, params)
        room = rdp_budget(epsilon, delta, a)
        if room <= 0 or math.isinf(r):
            continue
        t = math.inf if r == 0.0 else math.floor(room / r)
        # floor on floats: step back while the exact check fails
        while t > 0 and not math.isinf(t) and epsilon_at_order(t * r, a, delta) > epsilon:
            t -= 1
        best = max(best, t)
    if math.isinf(best):
        return 2**62
    return int(best)


def rdp_curve(params: MechanismParams, orders: Sequence[float]) -> list[float]:
    return [query_rdp(a, params) for a in orders]
