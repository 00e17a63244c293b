"""Directed rounding (``pmixed.privacy.rounding``, docs/privacy.md section 7): a budget's totals
and its (C1) epsilon are never below their exact values, checked against exact rationals and
50-digit logarithms; the round-to-nearest arithmetic used before is caught on pinned cases (found
in review: a ledger at its limit certified an interaction whose exact epsilon was above it); and
a ledger written with that arithmetic still reopens and keeps working."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pmixed.privacy.acceptance as acceptance
import pmixed.privacy.accountant as accountant
import pmixed.privacy.conversion as conversion
import pmixed.privacy.ledger as ledger_mod
from pmixed.errors import BudgetExhausted
from pmixed.privacy.acceptance import RenyiFilterRule
from pmixed.privacy.accountant import RdpCharge, compose_curve, compose_curve_nearest
from pmixed.privacy.conversion import epsilon_at_order, rdp_budget
from pmixed.privacy.ledger import MEMORY, Ledger
from pmixed.privacy.rounding import add_up, ceil_float, compose_up, floor_float

ORDERS = (2.0, 3.0)
DELTA = 1e-5


def exact_c1(rho: Fraction, order: float, delta: float) -> mpmath.mpf:
    """Eq. (C1) at 50 digits for an exact rho."""
    with mpmath.workdps(50):
        a, d = mpmath.mpf(order), mpmath.mpf(delta)
        return (mpmath.mpf(rho.numerator) / rho.denominator + mpmath.log((a - 1) / a)
                - (mpmath.log(d) + mpmath.log(a)) / (a - 1))


def legacy_epsilon_at_order(rho: float, order: float, delta: float) -> float:
    """(C1) as it was computed before: round to nearest."""
    if math.isinf(rho) or math.isnan(rho):
        return math.inf
    a = float(order)
    return rho + (math.log((a - 1.0) / a) - (math.log(delta) + math.log(a)) / (a - 1.0))


def one_at_a_time(compose, r: float, n: int) -> float:
    s = (0.0,)
    for _ in range(n):
        s = compose(s, (r,), 1)
    return s[0]


def test_ceil_and_floor_bracket_the_exact_value():
    third = Fraction(1, 3)
    lo, hi = floor_float(third), ceil_float(third)
    assert Fraction(lo) < third < Fraction(hi) and math.nextafter(lo, 1.0) == hi
    assert ceil_float(Fraction(1, 2)) == floor_float(Fraction(1, 2)) == 0.5
    assert ceil_float(Fraction(10**400)) == math.inf
    assert compose_up(math.inf, 0.1, 3) == math.inf and compose_up(1.0, math.inf, 1) == math.inf
    assert compose_up(0.25, math.inf, 0) == 0.25


# r, n where charging r one query at a time to nearest ends below n r (the reviewer's first case)
PINNED = (0.0015679613969893842, 62)


def test_the_old_composition_under_charges_and_today_s_does_not():
    """The check below can fail: the round-to-nearest sum of the pinned case is below the exact one."""
    r, n = PINNED
    exact = n * Fraction(r)
    assert Fraction(one_at_a_time(compose_curve_nearest, r, n)) < exact  # the unsound arithmetic, caught
    assert Fraction(one_at_a_time(compose_curve, r, n)) >= exact


@settings(max_examples=200, deadline=None)
@given(r=st.floats(1e-9, 1.0), n=st.integers(1, 300), count=st.integers(1, 5))
def test_composed_totals_are_never_below_the_exact_sum(r, n, count):
    s = (0.0,)
    for _ in range(n):
        s = compose_curve(s, (r,), count)
    assert Fraction(s[0]) >= n * count * Fraction(r)


def test_the_old_conversion_under_states_epsilon_on_a_pinned_case():
    rho, order, delta = 0.40484378180777547, 63, 1e-6  # found by random search; about half the cases are
    assert legacy_epsilon_at_order(rho, order, delta) < exact_c1(Fraction(rho), order, delta)
    assert epsilon_at_order(rho, order, delta) >= exact_c1(Fraction(rho), order, delta)


@settings(max_examples=300, deadline=None)
@given(rho=st.floats(0.0, 50.0), order=st.integers(2, 256), delta=st.sampled_from([1e-3, 1e-5, 1e-6, 1e-9, 1e-12]))
def test_conversion_is_never_below_the_exact_value_and_its_inverse_never_above(rho, order, delta):
    eps = epsilon_at_order(rho, order, delta)
    assert eps >= exact_c1(Fraction(rho), order, delta)
    assert eps - float(exact_c1(Fraction(rho), order, delta)) <= 1e-13 * (1.0 + abs(eps))  # and only just
    target = 0.5 + rho
    room = rdp_budget(target, delta, order)
    if room >= 0:
        assert epsilon_at_order(room, order, delta) <= target  # exactly, not approximately
        assert exact_c1(Fraction(room), order, delta) <= target


def test_a_ledger_at_its_limit_certifies_no_less_than_the_exact_epsilon():
    """The reviewer's reproduction: the limit set to what the old arithmetic certified after n
    charges. Today the ledger refuses the last one, and what it certifies bounds the exact value."""
    r, n = PINNED
    rule = RenyiFilterRule(2)
    old_total = one_at_a_time(compose_curve_nearest, r, n)
    limit = legacy_epsilon_at_order(old_total, 2, DELTA)
    assert exact_c1(n * Fraction(r), 2, DELTA) > limit  # n charges do not fit, exactly
    with Ledger(MEMORY, epsilon=limit, delta=DELTA, orders=ORDERS, rule=rule) as led:
        c = RdpCharge(ORDERS, (r, r))
        taken = 0
        with pytest.raises(BudgetExhausted):
            for _ in range(n):
                led.charge(c)
                taken += 1
        assert taken < n
        assert exact_c1(taken * Fraction(r), 2, DELTA) <= led.epsilon_spent() <= limit


def test_a_ledger_written_with_the_old_rounding_reopens_and_keeps_working(tmp_path, monkeypatch):
    """Histories composed to nearest, then continued today: the totals lie between the two replays,
    so the file opens; a tampered total outside them is still refused."""
    path = tmp_path / "old.ledger"
    r = PINNED[0]
    c = RdpCharge(ORDERS, (r, 3 * r))
    with monkeypatch.context() as m:  # an older pmixed's arithmetic
        m.setattr(accountant, "compose_curve", compose_curve_nearest)
        m.setattr(ledger_mod, "compose_curve", compose_curve_nearest)
        m.setattr(conversion, "epsilon_at_order", legacy_epsilon_at_order)
        m.setattr(acceptance, "epsilon_at_order", legacy_epsilon_at_order)
        with Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS) as led:
            for _ in range(PINNED[1]):
                led.charge(c)
            old = led.spent_rdp()
    assert Fraction(old[0]) < PINNED[1] * Fraction(r)  # this history is one the new replay does not reproduce
    with Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS) as led:  # reopens
        assert led.spent_rdp() == old
        led.charge(c)  # continued with today's rounding
        with led.reserve(c, up_to=5) as res:
            assert res.take()
    with Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS) as led:  # a mixed history reopens too
        assert led.charges() == PINNED[1] + 3
    import sqlite3

    conn = sqlite3.connect(path)
    rdp = conn.execute("SELECT rdp FROM totals").fetchone()[0]
    conn.execute("UPDATE totals SET rdp = ?", (rdp.replace(rdp.split(",")[0].strip("[ "), "0.5", 1),))
    conn.commit()
    conn.close()
    with pytest.raises(ledger_mod.LedgerError, match="inconsistent"):
        Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS)


def test_a_grant_refunded_whole_leaves_the_totals_where_they_were(tmp_path):
    """Rounding up adds a little to a grant; a refund of all of it removes that too (else a
    request refused before its first token would leave a residue, and (C1) of any rho > 0 is at
    least its offset: epsilon 4.8 'spent' for nothing at delta 1e-5). Used queries keep their cost."""
    path = tmp_path / "r.ledger"
    r = PINNED[0]
    c = RdpCharge(ORDERS, (r, 3 * r))
    with Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS) as led:
        with led.reserve(c, up_to=PINNED[1]):
            pass  # nothing taken
        assert led.spent_rdp() == (0.0, 0.0) and led.epsilon_spent() == 0.0
        with led.reserve(c, up_to=PINNED[1]) as res:
            for _ in range(5):
                assert res.take()
        assert all(Fraction(x) >= 5 * Fraction(y) for x, y in zip(led.spent_rdp(), c.rdp))
    with Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS) as led:  # the replay accepts both refunds
        assert led.charges() == 4


@settings(max_examples=500, deadline=None)
@given(a=st.floats(-1e6, 1e6), b=st.floats(-1e6, 1e6))
def test_add_up_is_the_exact_sum_rounded_up(a, b):
    assert add_up(a, b) == ceil_float(Fraction(a) + Fraction(b))


def test_a_refund_of_an_unhashable_charge_id_is_a_clear_ledger_error(tmp_path):
    import json
    import sqlite3

    path = tmp_path / "t.ledger"
    with Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS) as led:
        with led.reserve(RdpCharge(ORDERS, (0.01, 0.02)), up_to=3):
            pass
    conn = sqlite3.connect(path)
    rid, params = conn.execute("SELECT id, params FROM charges WHERE mechanism != '' ORDER BY id DESC").fetchone()
    conn.execute("UPDATE charges SET params = ? WHERE id = ?", (json.dumps({**json.loads(params), "refund_of": [1]}), rid))
    conn.commit()
    conn.close()
    with pytest.raises(ledger_mod.LedgerError, match="refund record"):
        Ledger(path, epsilon=8.0, delta=DELTA, orders=ORDERS)
