"""In-memory Renyi-DP accounting: charges, their composition, and the (epsilon, delta) they cost.

A :class:`RdpCharge` is an RDP curve (rho at each order alpha) applied ``count`` times. Charges
compose additively, order by order (Mironov 2017, "Renyi differential privacy", Proposition 1):
after charges c_1..c_m the mechanism is (alpha, sum_j count_j * rho_j(alpha))-RDP at every alpha.
The (epsilon, delta) spent is the best conversion over the orders (privacy/conversion.py, eq. (C1)).

:class:`RdpAccountant` follows the habits of Google's ``dp_accounting``: events are frozen,
and :meth:`RdpAccountant.compose` checks the whole charge (validity *and* budget) before it
changes any state, so a refused charge leaves the accountant exactly as it was. The durable,
multi-process version of the same thing is :class:`pmixed.privacy.ledger.Ledger`.

Orders: the accountant keeps its own grid of orders. A charge is mapped onto that grid: an
order of the grid that the charge does not list counts as inf (no claim), and orders of the
charge that are not on the grid are ignored.

This module is pure standard library (no torch, no numpy).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pmixed.errors import BudgetExhausted, ConfigError
from pmixed.privacy.conversion import check_delta, check_epsilon, rdp_to_epsilon

__all__ = [
    "DEFAULT_ORDERS",
    "RdpCharge",
    "RdpAccountant",
    "check_orders",
    "compose_curve",
    "curve_epsilon",
    "project_charge",
    "queries_left",
]

#: The default grid of Renyi orders: 2..64, then 80, 96, 128, 256.
DEFAULT_ORDERS: tuple[float, ...] = tuple(float(a) for a in range(2, 65)) + (80.0, 96.0, 128.0, 256.0)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_orders(orders: Iterable[float], field: str = "orders") -> tuple[float, ...]:
    """Validate a grid of Renyi orders (non-empty, finite, > 1, no repeats); return it as floats."""
    if isinstance(orders, (str, bytes)):
        raise ConfigError(field, f"must be a sequence of numbers > 1, got {orders!r}")
    try:
        out = tuple(orders)
    except TypeError:
        raise ConfigError(field, f"must be a sequence of numbers > 1, got {orders!r}") from None
    if not out:
        raise ConfigError(field, "must not be empty")
    for a in out:
        if not _is_number(a) or not math.isfinite(a) or not a > 1.0:
            raise ConfigError(field, f"Renyi orders must be finite numbers > 1, got {a!r}")
    floats = tuple(float(a) for a in out)
    if len(set(floats)) != len(floats):
        raise ConfigError(field, f"orders must not repeat, got {out!r}")
    return floats


@dataclass(frozen=True)
class RdpCharge:
    """An RDP curve ``rdp[i]`` at ``orders[i]``, charged ``count`` times.

    ``rdp`` values are >= 0; ``inf`` means "no claim at that order". Lists are accepted and
    stored as tuples of floats.
    """

    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    count: int = 1
    label: str = ""

    def __post_init__(self) -> None:
        orders = check_orders(self.orders)
        if isinstance(self.rdp, (str, bytes)):
            raise ConfigError("rdp", f"must be a sequence of numbers >= 0, got {self.rdp!r}")
        try:
            rdp = tuple(self.rdp)
        except TypeError:
            raise ConfigError("rdp", f"must be a sequence of numbers >= 0, got {self.rdp!r}") from None
        if len(rdp) != len(orders):
            raise ConfigError(
                "rdp", f"has {len(rdp)} values for {len(orders)} orders; they must have the same length"
            )
        for a, r in zip(orders, rdp, strict=True):
            if not _is_number(r) or math.isnan(r) or not r >= 0.0:
                raise ConfigError("rdp", f"RDP at order {a:g} must be a number >= 0 (inf = no claim), got {r!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError("count", f"must be an integer >= 1, got {self.count!r}")
        if not isinstance(self.label, str):
            raise ConfigError("label", f"must be a string, got {self.label!r}")
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "rdp", tuple(float(r) for r in rdp))

    @classmethod
    def for_queries(
        cls, params, count: int = 1, orders: Sequence[float] = DEFAULT_ORDERS, label: str = ""
    ) -> RdpCharge:
        """The charge of ``count`` PMixED queries with ``params`` (a MechanismParams), eq. (R3)."""
        from pmixed.privacy.mixture_bound import query_rdp

        orders = check_orders(orders)
        return cls(orders, tuple(query_rdp(a, params) for a in orders), count, label)

    def total(self) -> tuple[float, ...]:
        """The curve times ``count`` (what this charge adds to the spent curve)."""
        return tuple(r * self.count for r in self.rdp)


def project_charge(charge: RdpCharge, orders: Sequence[float]) -> tuple[float, ...]:
    """The charge's per-unit curve on the grid ``orders``: orders it does not list are inf."""
    if not isinstance(charge, RdpCharge):
        raise TypeError(f"expected an RdpCharge, got {type(charge).__name__}")
    by_order = dict(zip(charge.orders, charge.rdp, strict=True))
    return tuple(by_order.get(float(a), math.inf) for a in orders)


def compose_curve(spent: Sequence[float], rdp: Sequence[float], count: int) -> tuple[float, ...]:
    """``spent + count * rdp``, order by order (Mironov 2017, Prop. 1).

    Always evaluated as ``s + r * count`` left to right, so that replaying a history in the same
    order reproduces the totals bit for bit (the ledger relies on it).
    """
    if len(spent) != len(rdp):
        raise ValueError("curves must have the same length")
    return tuple(s + r * count for s, r in zip(spent, rdp, strict=True))


def curve_epsilon(orders: Sequence[float], curve: Sequence[float], delta: float) -> float:
    """The epsilon of an RDP curve: rdp_to_epsilon's best conversion, clamped at 0.

    An order with rho == 0 means the Renyi divergence is 0, i.e. the output distributions are
    identical on neighbours: epsilon is 0 (this covers "nothing spent").
    """
    if any(r == 0.0 for r in curve):
        return 0.0
    eps, _ = rdp_to_epsilon(orders, curve, delta)
    return max(0.0, eps)


#: What :func:`queries_left` returns when no number of further queries would exhaust the budget
#: (the per-query curve is 0 at an order where nothing is spent yet).
UNLIMITED = 2**62


def check_curve(rdp: Sequence[float], n: int, field: str = "rdp") -> tuple[float, ...]:
    """Validate a per-query RDP curve of length ``n`` (numbers >= 0; inf = no claim)."""
    if isinstance(rdp, (str, bytes)):
        raise ConfigError(field, f"must be a sequence of numbers >= 0, got {rdp!r}")
    try:
        out = tuple(rdp)
    except TypeError:
        raise ConfigError(field, f"must be a sequence of numbers >= 0, got {rdp!r}") from None
    if len(out) != n:
        raise ConfigError(field, f"has {len(out)} values for {n} orders; they must have the same length")
    for r in out:
        if not _is_number(r) or math.isnan(r) or not r >= 0.0:
            raise ConfigError(field, f"RDP values must be numbers >= 0 (inf = no claim), got {r!r}")
    return tuple(float(r) for r in out)


def queries_left(affords: Callable[[int], bool]) -> int:
    """The largest k >= 0 with ``affords(k)`` true and ``affords(k + 1)`` false.

    Doubling, then bisection on the bracket (lo affordable, hi not), so the answer satisfies that
    pair of conditions exactly even where ``affords`` is not monotone under rounding. Returns 0
    when ``affords(0)`` is false and :data:`UNLIMITED` when ``affords(UNLIMITED)`` is true.
    """
    if not affords(0):
        return 0
    lo, hi = 0, 1
    while affords(hi):
        if hi >= UNLIMITED:
            return UNLIMITED
        lo, hi = hi, min(2 * hi, UNLIMITED)
    while hi - lo > 1:  # invariant: affords(lo) and not affords(hi)
        mid = (lo + hi) // 2
        if affords(mid):
            lo = mid
        else:
            hi = mid
    return lo


class RdpAccountant:
    """The spent RDP curve of one budget (epsilon, delta), held in memory.

    ``compose`` is atomic with respect to other threads using the same accountant.
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS, *, epsilon: float, delta: float):
        check_epsilon(epsilon)
        check_delta(delta)
        self._orders = check_orders(orders)
        self._epsilon = float(epsilon)
        self._delta = float(delta)
        self._spent: tuple[float, ...] = (0.0,) * len(self._orders)
        self._charges = 0
        self._lock = threading.Lock()

    # -- read-only views -------------------------------------------------------------------
    @property
    def orders(self) -> tuple[float, ...]:
        return self._orders

    @property
    def epsilon(self) -> float:
        """The limit."""
        return self._epsilon

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def charges(self) -> int:
        """How many charges (events, not counts) were accepted."""
        return self._charges

    def spent_rdp(self) -> tuple[float, ...]:
        """The spent RDP at each of :attr:`orders`."""
        return self._spent

    def epsilon_spent(self) -> float:
        return curve_epsilon(self._orders, self._spent, self._delta)

    def remaining(self) -> float:
        """The epsilon left (limit - spent, >= 0). Informational: RDP composes sub-linearly in
        epsilon, so use :meth:`can_afford` to know whether a charge fits."""
        return max(0.0, self._epsilon - self.epsilon_spent())

    # -- what-if -----------------------------------------------------------------------------
    def _after(self, charge: RdpCharge) -> tuple[tuple[float, ...], float]:
        rdp = project_charge(charge, self._orders)
        curve = compose_curve(self._spent, rdp, charge.count)
        return curve, curve_epsilon(self._orders, curve, self._delta)

    def epsilon_if(self, charge: RdpCharge) -> float:
        """The epsilon spent after ``charge``, without recording it."""
        return self._after(charge)[1]

    def can_afford(self, charge: RdpCharge) -> bool:
        return self.epsilon_if(charge) <= self._epsilon

    def queries_left(self, rdp: Sequence[float]) -> int:
        """How many more queries with per-query curve ``rdp`` (at :attr:`orders`) fit the budget."""
        return _queries_left(self._orders, self._spent, rdp, self._delta, self._epsilon)

    # -- the one mutation -------------------------------------------------------------------
    def compose(self, charge: RdpCharge) -> float:
        """Record ``charge`` and return the epsilon spent after it.

        Raises :class:`BudgetExhausted` (state unchanged) when the epsilon after the charge would
        exceed the limit; a charge that lands exactly on the limit is accepted.
        """
        with self._lock:
            curve, eps_after = self._after(charge)
            if not eps_after <= self._epsilon:
                raise BudgetExhausted(
                    self.epsilon_spent(), eps_after, self._epsilon, detail=_describe(charge)
                )
            self._spent = curve
            self._charges += 1
            return eps_after

    def __repr__(self) -> str:
        return (
            f"RdpAccountant(epsilon={self._epsilon!r}, delta={self._delta!r}, "
            f"orders={len(self._orders)}, charges={self._charges}, spent={self.epsilon_spent():.6g})"
        )


def _queries_left(orders, spent, rdp, delta: float, limit: float) -> int:
    rdp = check_curve(rdp, len(orders))

    def affords(k: int) -> bool:
        curve = spent if k == 0 else compose_curve(spent, rdp, k)
        return curve_epsilon(orders, curve, delta) <= limit

    return queries_left(affords)


def _describe(charge: RdpCharge) -> str:
    what = f"charge {charge.label!r}" if charge.label else "charge"
    return f"{what} x{charge.count}"
