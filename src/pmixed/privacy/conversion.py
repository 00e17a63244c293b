"""Renyi DP -> (epsilon, delta)-DP, and its inverse.

Conversion (Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis testing interpretations and
Renyi differential privacy", Theorem 21; docs/privacy.md, eq. (C1)): a mechanism that is
(alpha, rho)-RDP for some alpha > 1 is (epsilon, delta)-DP with

    epsilon = rho + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1).

The best epsilon of an RDP curve is the minimum over the orders it claims (inf values are
orders with no claim and are skipped).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from fractions import Fraction

from pmixed.errors import ConfigError
from pmixed.privacy.rounding import UNIT_ROUNDOFF, add_up, ceil_float


def check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0) or math.isnan(delta):
        raise ConfigError("delta", f"must lie in (0, 1), got {delta!r}")


def check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and epsilon > 0.0 and math.isfinite(epsilon)):
        raise ConfigError("epsilon", f"must be a finite number > 0, got {epsilon!r}")


@functools.lru_cache(maxsize=4096)
def conversion_offset(order: float, delta: float) -> float:
    """The amount eq. (C1) adds to rho, log((a-1)/a) - (log(delta) + log(a)) / (a-1), rounded up:
    the two terms as computed plus 16 u (1 + |each|), more than the rounding of the division, the
    three logarithms (each within an ulp, and an argument's relative error u moves a logarithm by
    at most u) and the sums can take off."""
    a = float(order)
    if not a > 1.0:
        raise ConfigError("alpha", f"Renyi orders must be > 1, got {order!r}")
    t1 = math.log((a - 1.0) / a)
    t2 = -(math.log(delta) + math.log(a)) / (a - 1.0)
    slack = 16.0 * UNIT_ROUNDOFF * (1.0 + abs(t1) + abs(t2))
    return ceil_float(Fraction(t1) + Fraction(t2) + Fraction(slack))


def epsilon_at_order(rho: float, order: float, delta: float) -> float:
    """Eq. (C1) at one order, rounded up; inf when rho is inf (no claim at that order)."""
    if math.isinf(rho) or math.isnan(rho):
        return math.inf
    return add_up(rho, conversion_offset(order, delta))


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Best (epsilon, order) over the curve; (inf, nan) if no order makes a claim."""
    check_delta(delta)
    if len(orders) != len(rdp):
        raise ValueError("orders and rdp must have the same length")
    best = (math.inf, math.nan)
    for a, r in zip(orders, rdp):
        e = epsilon_at_order(r, a, delta)
        if e < best[0]:
            best = (e, float(a))
    return best


def rdp_budget(epsilon: float, delta: float, order: float) -> float:
    """The largest rho with epsilon_at_order(rho, order, delta) <= epsilon (eq. (C1) inverted).

    May be <= 0, meaning the target cannot be met at this order.
    """
    check_epsilon(epsilon)
    check_delta(delta)
    return -add_up(-epsilon, conversion_offset(order, delta))  # rounded down
