"""Renyi-DP accounting: charges, their composition, and one read API for every budget.

A :class:`RdpCharge` is an RDP curve (rho at each order alpha) applied ``count`` times, together
with what it was (``mechanism`` and its JSON-able ``params``, so that a history can be replayed
and audited). Charges compose additively, order by order (Mironov 2017, "Renyi differential
privacy", Proposition 1): after charges c_1..c_m the mechanism is
(alpha, sum_j count_j * rho_j(alpha))-RDP at every alpha. Whether a charge is accepted is decided
by an acceptance rule (privacy/acceptance.py; by default the best conversion over the orders,
privacy/conversion.py, eq. (C1)).

:class:`Budget` is the read API and the refuse-or-commit policy shared by the in-memory
:class:`RdpAccountant` and the durable :class:`pmixed.privacy.ledger.Ledger`: the same names with
the same return types on both (``orders``, ``epsilon``, ``delta``, ``rule``, ``spent_rdp()``,
``charges()``, ``epsilon_spent()``, ``remaining()``, ``epsilon_if(c)``, ``can_afford(c)``,
``queries_left(rdp)``, ``history()``, and ``charge(c)`` = ``compose(c)`` returning a
:class:`Receipt`). Following Google's ``dp_accounting``, events are frozen and a charge is checked
whole (validity *and* budget) before any state changes, so a refused charge leaves the budget
exactly as it was.

Orders: a budget keeps its own grid of orders. A charge is mapped onto that grid: an order of the
grid that the charge does not list counts as inf (no claim), and orders of the charge that are
not on the grid are ignored.

This module is pure standard library (no torch, no numpy).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pmixed.errors import BudgetExhausted, ConfigError
from pmixed.privacy.acceptance import BEST_ORDER, AcceptanceRule, check_rule
from pmixed.privacy.conversion import check_delta, check_epsilon
from pmixed.privacy.rounding import compose_up

__all__ = [
    "DEFAULT_ORDERS",
    "UNLIMITED",
    "Budget",
    "ChargeRecord",
    "RdpAccountant",
    "RdpCharge",
    "Receipt",
    "check_curve",
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
    stored as tuples of floats. ``mechanism`` names what ran (e.g. ``"pmixed"``) and ``params``
    holds its parameters as a JSON object (str keys; numbers, strings, lists, dicts; finite), so
    that a recorded charge can be recomputed from them
    (:func:`pmixed.privacy.mixture_bound.pmixed_charge` builds both for PMixED queries).
    ``params`` is stored as a JSON-normalised copy and takes no part in the hash.
    """

    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    count: int = 1
    label: str = ""
    mechanism: str = ""
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

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
        if not isinstance(self.mechanism, str):
            raise ConfigError("mechanism", f"must be a string, got {self.mechanism!r}")
        object.__setattr__(self, "params", check_params(self.params))
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "rdp", tuple(float(r) for r in rdp))

    def total(self) -> tuple[float, ...]:
        """The curve times ``count`` (what this charge adds to the spent curve)."""
        return tuple(r * self.count for r in self.rdp)


def check_params(params: object, field: str = "params") -> dict[str, Any]:
    """A JSON-normalised copy of a mechanism's parameters (a mapping with str keys, finite)."""
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise ConfigError(field, f"must be a mapping with str keys, got {params!r}")
    try:
        return json.loads(dump_params(params))
    except (TypeError, ValueError) as e:
        raise ConfigError(field, f"must be JSON-able with finite numbers ({e}), got {params!r}") from None


def dump_params(params: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``params`` (sorted keys, no NaN/inf): what a ledger stores."""
    return json.dumps(dict(params), allow_nan=False, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Receipt:
    """Proof that a charge was committed: its id, the epsilon spent after it, and what is left."""

    id: int
    epsilon_spent: float
    remaining: float


@dataclass(frozen=True)
class ChargeRecord:
    """One committed charge. ``rdp`` is per unit, on the budget's orders; ``mechanism`` and
    ``params`` are the charge's (empty for charges recorded before ledger schema 2)."""

    id: int
    time: float
    count: int
    label: str
    rdp: tuple[float, ...]
    epsilon_after: float
    mechanism: str = ""
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)


def project_charge(charge: RdpCharge, orders: Sequence[float]) -> tuple[float, ...]:
    """The charge's per-unit curve on the grid ``orders``: orders it does not list are inf."""
    if not isinstance(charge, RdpCharge):
        raise TypeError(f"expected an RdpCharge, got {type(charge).__name__}")
    by_order = dict(zip(charge.orders, charge.rdp, strict=True))
    return tuple(by_order.get(float(a), math.inf) for a in orders)


def compose_curve(spent: Sequence[float], rdp: Sequence[float], count: int) -> tuple[float, ...]:
    """``spent + count * rdp``, order by order (Mironov 2017, Prop. 1).

    Each entry is the exact sum rounded up (``rounding.compose_up``), never below it, so a
    budget's totals never under-state what was charged; deterministic, so that replaying a history
    in the same order reproduces the totals bit for bit (the ledger relies on it).
    """
    if len(spent) != len(rdp):
        raise ValueError("curves must have the same length")
    return tuple(compose_up(s, r, count) for s, r in zip(spent, rdp, strict=True))


def compose_curve_nearest(spent: Sequence[float], rdp: Sequence[float], count: int) -> tuple[float, ...]:
    """``s + r * count`` in round-to-nearest float arithmetic: how totals were composed before
    they were rounded up (ledgers written then replay within [this, ``compose_curve``])."""
    if len(spent) != len(rdp):
        raise ValueError("curves must have the same length")
    return tuple(s + r * count for s, r in zip(spent, rdp, strict=True))


def curve_epsilon(orders: Sequence[float], curve: Sequence[float], delta: float) -> float:
    """The epsilon of an RDP curve: rdp_to_epsilon's best conversion, clamped at 0.

    An order with rho == 0 means the Renyi divergence is 0, i.e. the output distributions are
    identical on neighbours: epsilon is 0 (this covers "nothing spent"). This is
    :class:`~pmixed.privacy.acceptance.BestOrderRule`'s epsilon, the default rule.
    """
    return BEST_ORDER.epsilon(orders, curve, delta)


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


class Budget:
    """The read API and the refuse-or-commit policy of one budget (epsilon, delta, orders, rule).

    Subclasses hold the state: they set ``_orders``, ``_epsilon``, ``_delta``, ``_rule`` and
    implement :meth:`_totals` (the spent curve and the number of charges, as committed),
    :meth:`history` and :meth:`charge`, which must call :meth:`_decide` on the totals it holds
    locked. Every read reflects what is committed now; only :meth:`charge` is authoritative.
    """

    _orders: tuple[float, ...]
    _epsilon: float
    _delta: float
    _rule: AcceptanceRule

    # -- what subclasses provide -------------------------------------------------------------
    def _totals(self) -> tuple[tuple[float, ...], int]:
        raise NotImplementedError

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        """The committed charges, oldest first; with ``limit``, only the ``limit`` most recent."""
        raise NotImplementedError

    def charge(self, charge: RdpCharge) -> Receipt:
        """Record ``charge`` or refuse it (:class:`BudgetExhausted`, nothing recorded); a charge
        that lands exactly on the limit is accepted."""
        raise NotImplementedError

    def compose(self, charge: RdpCharge) -> Receipt:
        """dp_accounting's name for :meth:`charge`."""
        return self.charge(charge)

    # -- the budget ----------------------------------------------------------------------------
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
    def rule(self) -> AcceptanceRule:
        """The acceptance rule (privacy/acceptance.py)."""
        return self._rule

    # -- reads -----------------------------------------------------------------------------------
    def spent_rdp(self) -> tuple[float, ...]:
        """The spent RDP at each of :attr:`orders`."""
        return self._totals()[0]

    def charges(self) -> int:
        """How many charges (events, not counts) were accepted."""
        return self._totals()[1]

    def epsilon_spent(self) -> float:
        return self._rule.epsilon(self._orders, self.spent_rdp(), self._delta)

    def remaining(self) -> float:
        """The epsilon left (limit - spent, >= 0). Informational: RDP composes sub-linearly in
        epsilon, so use :meth:`can_afford` or :meth:`queries_left` to know what still fits."""
        return max(0.0, self._epsilon - self.epsilon_spent())

    def epsilon_if(self, charge: RdpCharge) -> float:
        """The epsilon spent after ``charge`` given what is committed now; records nothing."""
        rdp = project_charge(charge, self._orders)
        curve = compose_curve(self.spent_rdp(), rdp, charge.count)
        return self._rule.epsilon(self._orders, curve, self._delta)

    def can_afford(self, charge: RdpCharge) -> bool:
        return self.epsilon_if(charge) <= self._epsilon

    def queries_left(self, rdp: Sequence[float]) -> int:
        """The largest k >= 0 such that k more queries with per-query RDP curve ``rdp`` (at
        :attr:`orders`) fit the budget given what is committed now and k + 1 do not (see
        :func:`queries_left`; :data:`UNLIMITED` if no k exhausts it). Informational, like
        :meth:`can_afford`: another process may charge in between."""
        return _queries_left(self._orders, self.spent_rdp(), rdp, self._delta, self._epsilon, self._rule)

    # -- the policy --------------------------------------------------------------------------------
    def _decide(self, spent: Sequence[float], rdp: tuple[float, ...], charge: RdpCharge):
        """The curve and epsilon after ``charge`` (per-unit ``rdp`` on :attr:`orders`) on top of
        ``spent``, or :class:`BudgetExhausted` if the rule's epsilon after it exceeds the limit
        (NaN is refused too)."""
        curve = compose_curve(spent, rdp, charge.count)
        eps_after = self._rule.epsilon(self._orders, curve, self._delta)
        if not eps_after <= self._epsilon:
            raise BudgetExhausted(
                self._rule.epsilon(self._orders, spent, self._delta),
                eps_after,
                self._epsilon,
                detail=_describe(charge),
            )
        return curve, eps_after

    def _receipt(self, charge_id: int, eps_after: float) -> Receipt:
        return Receipt(charge_id, eps_after, max(0.0, self._epsilon - eps_after))


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError("limit", f"must be None or an integer >= 0, got {limit!r}")


class RdpAccountant(Budget):
    """The spent RDP curve of one budget (epsilon, delta), held in memory.

    ``charge``/``compose`` is atomic with respect to other threads using the same accountant.
    """

    def __init__(
        self,
        orders: Sequence[float] = DEFAULT_ORDERS,
        *,
        epsilon: float,
        delta: float,
        rule: AcceptanceRule = BEST_ORDER,
    ):
        check_epsilon(epsilon)
        check_delta(delta)
        self._orders = check_orders(orders)
        self._rule = check_rule(rule)
        self._rule.check_orders(self._orders)
        self._epsilon = float(epsilon)
        self._delta = float(delta)
        self._spent: tuple[float, ...] = (0.0,) * len(self._orders)
        self._history: list[ChargeRecord] = []
        self._lock = threading.Lock()

    def _totals(self) -> tuple[tuple[float, ...], int]:
        with self._lock:
            return self._spent, len(self._history)

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        check_limit(limit)
        with self._lock:
            out = list(self._history)
        return out if limit is None else out[len(out) - limit :]

    def charge(self, charge: RdpCharge) -> Receipt:
        rdp = project_charge(charge, self._orders)
        with self._lock:
            curve, eps_after = self._decide(self._spent, rdp, charge)
            charge_id = len(self._history) + 1
            self._history.append(
                ChargeRecord(
                    charge_id, time.time(), charge.count, charge.label, rdp, eps_after,
                    charge.mechanism, charge.params,
                )
            )
            self._spent = curve
        return self._receipt(charge_id, eps_after)

    def __repr__(self) -> str:
        return (
            f"RdpAccountant(epsilon={self._epsilon!r}, delta={self._delta!r}, "
            f"orders={len(self._orders)}, charges={self.charges()}, spent={self.epsilon_spent():.6g})"
        )


def _queries_left(orders, spent, rdp, delta: float, limit: float, rule: AcceptanceRule) -> int:
    rdp = check_curve(rdp, len(orders))

    def affords(k: int) -> bool:
        curve = spent if k == 0 else compose_curve(spent, rdp, k)
        return rule.epsilon(orders, curve, delta) <= limit

    return queries_left(affords)


def _describe(charge: RdpCharge) -> str:
    what = f"charge {charge.label!r}" if charge.label else "charge"
    return f"{what} x{charge.count}"
