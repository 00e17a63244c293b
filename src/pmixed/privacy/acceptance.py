"""Acceptance rules: which epsilon a spent RDP curve certifies, hence whether a charge is accepted.

A budget (:class:`~pmixed.privacy.accountant.RdpAccountant` or the durable
:class:`~pmixed.privacy.ledger.Ledger`) accepts a charge iff ``rule.epsilon(orders, curve_after,
delta) <= limit``, where ``curve_after`` is the spent curve with the charge added. The rule is a
named, replaceable object; a ledger records its rule's :attr:`~AcceptanceRule.name` and is never
reopened under another one (a different rule could accept a history that the first one would have
refused, or certify a different epsilon for it).

:class:`BestOrderRule` (the default): the minimum of (C1) over all
orders of the grid (docs/privacy.md, section 5). This is valid when the per-query costs are fixed
in advance, independently of the data and of earlier outputs: composition (Mironov 2017, Prop. 1)
then gives the whole curve, and any one order of it converts to (epsilon, delta) (Balle et al.
2020, Theorem 21), so the best order may be picked after the fact.

It is *not* a valid privacy filter when the costs are chosen adaptively (they depend on released
outputs): Feldman & Zrnic (2021, "Individual privacy accounting via a Renyi filter") prove
filters for one order fixed in advance; a grid of orders then needs delta split over the grid.
:class:`RenyiFilterRule` is that rule (``name = "renyi-filter/alpha=8"``: epsilon = (C1) at that
order alone); ledgers written under it reopen with it. Other rules register themselves with
:func:`register_rule`.

Pure standard library.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pmixed.errors import ConfigError
from pmixed.privacy.conversion import epsilon_at_order, rdp_to_epsilon

__all__ = ["BEST_ORDER", "AcceptanceRule", "BestOrderRule", "RenyiFilterRule", "register_rule", "rule_named"]


@runtime_checkable
class AcceptanceRule(Protocol):
    """What a budget asks before it accepts a charge.

    ``name`` identifies the rule (and its parameters, if any) in a ledger: two rules with the same
    name must certify the same epsilon for every curve.
    """

    @property
    def name(self) -> str: ...

    def epsilon(self, orders: Sequence[float], curve: Sequence[float], delta: float) -> float:
        """The epsilon the spent ``curve`` (at ``orders``) certifies at ``delta``; inf = none.
        Must be non-decreasing in every entry of ``curve``."""
        ...

    def check_orders(self, orders: Sequence[float]) -> None:
        """Raise :class:`~pmixed.errors.ConfigError` if the rule cannot work on this grid."""
        ...


class BestOrderRule:
    """The minimum of (C1) over the orders (fixed per-query costs only), clamped at 0.

    An order with rho == 0 means the Renyi divergence is 0 (the output distributions are identical
    on neighbours): epsilon is 0 (this covers "nothing spent").
    """

    name = "best-order"

    def epsilon(self, orders: Sequence[float], curve: Sequence[float], delta: float) -> float:
        if any(r == 0.0 for r in curve):
            return 0.0
        eps, _ = rdp_to_epsilon(orders, curve, delta)
        return max(0.0, eps)

    def check_orders(self, orders: Sequence[float]) -> None:
        return None

    def __repr__(self) -> str:
        return "BestOrderRule()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BestOrderRule)

    def __hash__(self) -> int:
        return hash(self.name)


class RenyiFilterRule:
    """A Renyi filter at one order fixed in advance (Feldman & Zrnic 2021, "Individual privacy
    accounting via a Renyi filter", Theorem 3.1; docs/privacy.md, section 11).

    Valid when each charge's RDP at ``order`` is chosen adaptively (from public information and
    from what was already released): mechanisms run only while the sum of their RDP at ``order``
    stays within the budget rho(order) = epsilon - (C1)'s offset, and the whole interaction is
    then (order, rho)-RDP, hence (epsilon, delta)-DP by (C1) at that order alone. The order (and
    delta) must be fixed before the first charge: choosing the best order afterwards, as
    :class:`BestOrderRule` does, is valid for fixed costs only. The curve at every other order is
    recorded but certifies nothing.
    """

    def __init__(self, order: int):
        if isinstance(order, bool) or not isinstance(order, (int, float)) or order != int(order) or order < 2:
            raise ConfigError("filter_order", f"must be an integer >= 2, got {order!r}")
        self.order = int(order)

    @property
    def name(self) -> str:
        return f"renyi-filter/alpha={self.order}"

    def _index(self, orders: Sequence[float]) -> int:
        for i, a in enumerate(orders):
            if float(a) == float(self.order):
                return i
        raise ConfigError("orders", f"the Renyi filter's order {self.order} is not in the budget's grid of orders")

    def epsilon(self, orders: Sequence[float], curve: Sequence[float], delta: float) -> float:
        rho = curve[self._index(orders)]
        if rho == 0.0:
            return 0.0
        return max(0.0, epsilon_at_order(rho, self.order, delta))

    def check_orders(self, orders: Sequence[float]) -> None:
        self._index(orders)

    def __repr__(self) -> str:
        return f"RenyiFilterRule({self.order})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RenyiFilterRule) and other.order == self.order

    def __hash__(self) -> int:
        return hash(self.name)


_FILTER_NAME = re.compile(r"renyi-filter/alpha=([0-9]+)")

#: The default rule.
BEST_ORDER = BestOrderRule()

_RULES: dict[str, AcceptanceRule] = {BEST_ORDER.name: BEST_ORDER}


def register_rule(rule: AcceptanceRule) -> None:
    """Make ``rule`` known by its name, so that ledgers recorded under it can be reopened."""
    if not isinstance(rule, AcceptanceRule) or not isinstance(rule.name, str) or not rule.name:
        raise ConfigError("rule", f"must be an AcceptanceRule with a non-empty name, got {rule!r}")
    known = _RULES.get(rule.name)
    if known is not None and known != rule:
        raise ConfigError("rule", f"another rule is already registered as {rule.name!r}")
    _RULES[rule.name] = rule


def rule_named(name: str) -> AcceptanceRule | None:
    """The registered rule called ``name`` (a Renyi filter's name gives that filter), or None."""
    m = _FILTER_NAME.fullmatch(name) if isinstance(name, str) else None
    if m is not None and int(m.group(1)) >= 2:
        return RenyiFilterRule(int(m.group(1)))
    return _RULES.get(name)


def check_rule(rule: object) -> AcceptanceRule:
    if not isinstance(rule, AcceptanceRule) or not isinstance(rule.name, str) or not rule.name:
        raise ConfigError("rule", f"must be an AcceptanceRule with a non-empty name, got {rule!r}")
    return rule
