"""queries_left: the exact number of further queries a budget affords (against brute force)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.errors import ConfigError
from pmixed.privacy.accountant import UNLIMITED, RdpAccountant, RdpCharge, queries_left
from pmixed.privacy.ledger import Ledger

DELTA = 1e-5
ORDERS = (2.0, 4.0, 8.0, 32.0)


def brute_force(budget, rdp) -> int:
    """Count by charging one query at a time on a copy-free what-if (epsilon_if with count k)."""
    k = 0
    while budget.can_afford(RdpCharge(budget.orders, rdp, count=k + 1)):
        k += 1
    return k


@settings(max_examples=60, deadline=None)
@given(
    limit=st.floats(0.5, 6.0),
    warmup=st.lists(st.floats(0.0, 0.3), min_size=len(ORDERS), max_size=len(ORDERS)),
    rdp=st.lists(
        st.one_of(st.floats(2e-3, 0.5), st.just(math.inf)), min_size=len(ORDERS), max_size=len(ORDERS)
    ).filter(lambda r: any(math.isfinite(x) for x in r)),
)
def test_queries_left_matches_brute_force(limit, warmup, rdp):
    acc = RdpAccountant(ORDERS, epsilon=limit, delta=DELTA)
    with Ledger(":memory:", epsilon=limit, delta=DELTA, orders=ORDERS) as led:
        w = RdpCharge(ORDERS, warmup)
        if acc.can_afford(w):
            acc.charge(w) if hasattr(acc, "charge") else acc.compose(w)
            led.charge(w)
        for budget in (acc, led):
            k = budget.queries_left(rdp)
            assert k == brute_force(budget, rdp)
            assert k == 0 or budget.can_afford(RdpCharge(ORDERS, rdp, count=k))
            assert not budget.can_afford(RdpCharge(ORDERS, rdp, count=k + 1))


def test_queries_left_large_counts_and_edges():
    acc = RdpAccountant(ORDERS, epsilon=8.0, delta=DELTA)
    rdp = (1e-7, 2e-7, 4e-7, 1.6e-6)
    k = acc.queries_left(rdp)
    assert k > 10**5
    assert acc.can_afford(RdpCharge(ORDERS, rdp, count=k))
    assert not acc.can_afford(RdpCharge(ORDERS, rdp, count=k + 1))
    assert acc.queries_left((math.inf,) * 4) == 0
    assert acc.queries_left((0.0, 1.0, 1.0, 1.0)) == UNLIMITED  # nothing spent at order 2: free
    with pytest.raises(ConfigError):
        acc.queries_left((0.1, 0.1))
    with pytest.raises(ConfigError):
        acc.queries_left((0.1, math.nan, 0.1, 0.1))


def test_bisection_helper_is_exact_for_any_predicate():
    for n in (0, 1, 2, 3, 7, 8, 1000, 12345):
        assert queries_left(lambda k, n=n: k <= n) == n
    assert queries_left(lambda k: False) == 0
