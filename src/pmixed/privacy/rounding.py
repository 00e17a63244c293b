"""Directed rounding of the privacy arithmetic: every spent amount is rounded up, every room left
rounded down (docs/privacy.md, section 7: charge more, never less).

Round-to-nearest float arithmetic can put a sum a few units in the last place below its exact
value; a ledger compared against its limit with such sums could accept an interaction whose exact
epsilon is above the limit. These helpers compute in exact rationals (``fractions.Fraction``) and
round once, in the safe direction. Deterministic, so a replay reproduces a ledger's totals bit for
bit. Pure standard library.
"""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = ["ceil_float", "floor_float", "compose_up", "add_up", "UNIT_ROUNDOFF"]

#: u = 2^-53: the relative error of one correctly rounded float64 operation.
UNIT_ROUNDOFF = 2.0**-53


def ceil_float(x: Fraction) -> float:
    """The smallest float >= x (inf beyond the largest float)."""
    try:
        f = float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.nextafter(math.inf, 0.0)
    if Fraction(f) < x:
        f = math.nextafter(f, math.inf)
    return f


def floor_float(x: Fraction) -> float:
    """The largest float <= x (-inf below the most negative float)."""
    try:
        f = float(x)
    except OverflowError:
        return -math.inf if x < 0 else math.nextafter(math.inf, 0.0)
    if Fraction(f) > x:
        f = math.nextafter(f, -math.inf)
    return f


def compose_up(spent: float, rdp: float, count: int) -> float:
    """``spent + count * rdp`` rounded up (Mironov 2017, Prop. 1, one order): never below the
    exact value; inf when either is inf (``rdp`` inf with ``count`` 0 adds nothing)."""
    if count == 0:
        return spent
    if math.isinf(spent) or math.isinf(rdp):
        return math.inf
    return ceil_float(Fraction(spent) + count * Fraction(rdp))


def add_up(a: float, b: float) -> float:
    """``a + b`` rounded up, for finite a, b: the float sum, moved up one place when its rounding
    error (Knuth's TwoSum, exact in float arithmetic) shows it below the exact sum."""
    s = a + b
    if not math.isfinite(s):
        return s
    bb = s - a
    err = (a - (s - bb)) + (b - bb)  # exactly (a + b) - s
    return math.nextafter(s, math.inf) if err > 0 else s
