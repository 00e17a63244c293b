"""RdpAccountant / RdpCharge: composition, conversion, refusals (pmixed.privacy.accountant)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.errors import BudgetExhausted, ConfigError
from pmixed.privacy.accountant import (
    DEFAULT_ORDERS,
    RdpAccountant,
    RdpCharge,
    compose_curve,
    curve_epsilon,
    project_charge,
)
from pmixed.privacy.conversion import epsilon_at_order, rdp_to_epsilon
from pmixed.privacy.mixture_bound import params_from_record, pmixed_charge
from pmixed.privacy.params import MechanismParams

DELTA = 1e-5


def gaussian_charge(sigma: float, orders=DEFAULT_ORDERS, count: int = 1, label: str = "") -> RdpCharge:
    """The Gaussian mechanism's curve alpha / (2 sigma^2) (sensitivity 1)."""
    return RdpCharge(tuple(orders), tuple(a / (2 * sigma**2) for a in orders), count, label)


def test_default_orders_cover_what_calibration_and_the_bound_use():
    """The grid must hold every integer order 2..64 (calibration picks alpha in 2..32 and the
    projection enforces up to K = alpha; query_rdp is inf above K, so each K must be a grid
    order or its charge would be read as inf), be increasing (messages, bisection) and floats
    (orders are compared as floats when a charge is projected onto a ledger's grid)."""
    from pmixed.privacy.calibration import calibrate

    assert set(range(2, 65)) <= {int(a) for a in DEFAULT_ORDERS if a == int(a)}
    assert list(DEFAULT_ORDERS) == sorted(set(DEFAULT_ORDERS))
    assert all(type(a) is float for a in DEFAULT_ORDERS)
    cal = calibrate(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=80, sample_rate=0.03)
    c = pmixed_charge(cal.params, count=1024)
    on_grid = [r for a, r in zip(c.orders, c.rdp, strict=True) if a <= cal.params.max_order]
    assert on_grid and all(math.isfinite(r) for r in on_grid)
    # the charge for the calibrated T lands within the budget on the default grid
    assert curve_epsilon(DEFAULT_ORDERS, c.total(), 1e-5) <= 8.0


def test_charge_is_frozen_and_normalised():
    c = RdpCharge([2, 3], [0.5, math.inf], count=3, label="q")
    assert c.orders == (2.0, 3.0) and c.rdp == (0.5, math.inf)
    assert c.total() == (1.5, math.inf)
    with pytest.raises(AttributeError):
        c.count = 4  # type: ignore[misc]
    assert hash(c) == hash(RdpCharge((2.0, 3.0), (0.5, math.inf), 3, "q"))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"orders": (2.0, 3.0), "rdp": (0.1,)}, "rdp"),
        ({"orders": (1.0,), "rdp": (0.1,)}, "orders"),
        ({"orders": (0.5,), "rdp": (0.1,)}, "orders"),
        ({"orders": (math.inf,), "rdp": (0.1,)}, "orders"),
        ({"orders": (math.nan,), "rdp": (0.1,)}, "orders"),
        ({"orders": (), "rdp": ()}, "orders"),
        ({"orders": (2.0, 2), "rdp": (0.1, 0.1)}, "orders"),
        ({"orders": (2.0,), "rdp": (-0.1,)}, "rdp"),
        ({"orders": (2.0,), "rdp": (math.nan,)}, "rdp"),
        ({"orders": (2.0,), "rdp": ("x",)}, "rdp"),
        ({"orders": (2.0,), "rdp": (0.1,), "count": 0}, "count"),
        ({"orders": (2.0,), "rdp": (0.1,), "count": 1.0}, "count"),
        ({"orders": (2.0,), "rdp": (0.1,), "count": True}, "count"),
        ({"orders": (2.0,), "rdp": (0.1,), "label": 3}, "label"),
    ],
)
def test_charge_validation(kwargs, field):
    with pytest.raises(ConfigError) as info:
        RdpCharge(**kwargs)
    assert info.value.field == field


def test_accountant_validation():
    with pytest.raises(ConfigError):
        RdpAccountant(epsilon=0.0, delta=DELTA)
    with pytest.raises(ConfigError):
        RdpAccountant(epsilon=1.0, delta=1.0)
    with pytest.raises(ConfigError):
        RdpAccountant((2.0, 0.9), epsilon=1.0, delta=DELTA)
    acc = RdpAccountant(epsilon=1.0, delta=DELTA)
    with pytest.raises(TypeError):
        acc.compose((2.0, 0.1))  # type: ignore[arg-type]


def test_nothing_spent_is_zero():
    acc = RdpAccountant(epsilon=1.0, delta=DELTA)
    assert acc.epsilon_spent() == 0.0
    assert acc.remaining() == 1.0
    assert acc.spent_rdp() == (0.0,) * len(DEFAULT_ORDERS)
    assert acc.charges() == 0


def test_composition_is_the_sum():
    acc = RdpAccountant(epsilon=100.0, delta=DELTA)
    charges = [gaussian_charge(4.0), gaussian_charge(8.0, count=5), gaussian_charge(2.0, count=2)]
    for c in charges:
        acc.compose(c)
    expected = [sum(c.rdp[i] * c.count for c in charges) for i in range(len(DEFAULT_ORDERS))]
    assert acc.spent_rdp() == pytest.approx(expected, rel=1e-15)
    assert acc.charges() == 3
    # count=n is n single charges
    a1 = RdpAccountant(epsilon=100.0, delta=DELTA)
    a2 = RdpAccountant(epsilon=100.0, delta=DELTA)
    a1.compose(RdpCharge((2.0, 4.0), (0.25, 0.5), count=4))
    for _ in range(4):
        a2.compose(RdpCharge((2.0, 4.0), (0.25, 0.5)))
    assert a1.spent_rdp() == a2.spent_rdp()


def test_epsilon_spent_matches_conversion():
    acc = RdpAccountant(epsilon=50.0, delta=DELTA)
    acc.compose(gaussian_charge(3.0, count=7))
    acc.compose(gaussian_charge(5.0, count=11))
    eps, order = rdp_to_epsilon(DEFAULT_ORDERS, acc.spent_rdp(), DELTA)
    assert acc.epsilon_spent() == eps
    assert 2.0 <= order <= 256.0
    assert acc.remaining() == pytest.approx(50.0 - eps)


def test_epsilon_if_and_can_afford_do_not_mutate():
    acc = RdpAccountant(epsilon=2.0, delta=DELTA)
    acc.compose(gaussian_charge(5.0))
    before = acc.spent_rdp()
    c = gaussian_charge(5.0, count=3)
    expected = curve_epsilon(DEFAULT_ORDERS, compose_curve(before, c.rdp, 3), DELTA)
    assert acc.epsilon_if(c) == expected
    assert acc.can_afford(c) == (expected <= 2.0)
    assert acc.can_afford(gaussian_charge(0.1)) is False
    assert acc.spent_rdp() == before and acc.charges() == 1


def test_refusal_leaves_state_unchanged_and_names_the_numbers():
    acc = RdpAccountant(epsilon=1.0, delta=DELTA)
    acc.compose(gaussian_charge(10.0, label="warmup"))
    spent, curve = acc.epsilon_spent(), acc.spent_rdp()
    big = gaussian_charge(0.5, count=3, label="too-much")
    would = acc.epsilon_if(big)
    with pytest.raises(BudgetExhausted) as info:
        acc.compose(big)
    err = info.value
    assert (err.spent, err.requested, err.limit) == (spent, would, 1.0)
    msg = str(err)
    assert f"spent epsilon={spent:.6g}" in msg
    assert f"epsilon={would:.6g}" in msg
    assert "limit epsilon=1" in msg
    assert "too-much" in msg and "x3" in msg
    assert acc.spent_rdp() == curve and acc.epsilon_spent() == spent and acc.charges() == 1


def test_exactly_reaching_the_limit_is_allowed():
    rho, order = 0.75, 8.0
    limit = epsilon_at_order(2 * rho, order, DELTA)  # the limit two charges land on exactly
    acc = RdpAccountant((order,), epsilon=limit, delta=DELTA)
    c = RdpCharge((order,), (rho,))
    acc.compose(c)
    assert acc.epsilon_spent() < limit
    assert acc.compose(c).epsilon_spent == limit  # == limit: accepted
    assert acc.epsilon_spent() == limit and acc.remaining() == 0.0
    with pytest.raises(BudgetExhausted):
        acc.compose(RdpCharge((order,), (1e-12,)))
    assert acc.epsilon_spent() == limit


def test_order_mapping():
    acc = RdpAccountant((2.0, 4.0, 8.0), epsilon=100.0, delta=DELTA)
    # 3.0 is not an accountant order (ignored); 8.0 is missing from the charge (inf)
    c = RdpCharge((2.0, 3.0, 4.0), (0.1, 0.2, 0.3))
    assert project_charge(c, acc.orders) == (0.1, 0.3, math.inf)
    acc.compose(c)
    assert acc.spent_rdp() == (0.1, 0.3, math.inf)
    assert acc.epsilon_spent() == rdp_to_epsilon((2.0, 4.0, 8.0), (0.1, 0.3, math.inf), DELTA)[0]
    # a charge claiming nothing on the grid is inf: always refused
    nothing = RdpCharge((3.0,), (0.0,))
    assert acc.epsilon_if(nothing) == math.inf
    with pytest.raises(BudgetExhausted):
        acc.compose(nothing)
    assert acc.spent_rdp() == (0.1, 0.3, math.inf)


def test_zero_rdp_is_free():
    acc = RdpAccountant((2.0, 4.0), epsilon=1.0, delta=DELTA)
    acc.compose(RdpCharge((2.0, 4.0), (0.0, 0.0), count=1000))
    assert acc.epsilon_spent() == 0.0


def test_pmixed_charge_uses_the_mechanism_bound_and_records_it():
    from pmixed.privacy.mixture_bound import query_rdp

    params = MechanismParams(ensemble_size=16, sample_rate=0.25, lam_max=0.75, radii=(0.01, 0.001, 1e-4))
    c = pmixed_charge(params, count=10, label="tok")
    assert c.count == 10 and c.label == "tok" and c.orders == DEFAULT_ORDERS
    assert c.rdp[0] == query_rdp(2.0, params)
    assert all(math.isinf(r) for a, r in zip(c.orders, c.rdp, strict=True) if a > params.max_order)
    assert c.mechanism == "pmixed"
    assert params_from_record(c.params) == params
    acc = RdpAccountant(epsilon=10.0, delta=DELTA)
    acc.compose(c)
    assert 0.0 < acc.epsilon_spent() < 10.0
    rec = acc.history()[-1]
    assert (rec.mechanism, rec.params, rec.label, rec.count) == ("pmixed", c.params, "tok", 10)


def test_charge_mechanism_and_params_are_validated_and_normalised():
    c = RdpCharge((2.0,), (0.1,), 1, "x", "gauss", {"sigma": 2, "shape": (1, 2)})
    assert c.params == {"sigma": 2, "shape": [1, 2]}  # a JSON-normalised copy
    assert hash(c) == hash(RdpCharge((2.0,), (0.1,), 1, "x", "gauss", {"sigma": 3}))  # params not hashed
    assert c != RdpCharge((2.0,), (0.1,), 1, "x", "gauss", {"sigma": 3})
    for bad in ({"s": math.inf}, {"s": math.nan}, {1: 2}, {"s": object()}, [("s", 1)]):
        with pytest.raises(ConfigError) as info:
            RdpCharge((2.0,), (0.1,), params=bad)
        assert info.value.field == "params"
    with pytest.raises(ConfigError):
        RdpCharge((2.0,), (0.1,), mechanism=3)  # type: ignore[arg-type]


def test_read_api_is_the_same_on_accountant_and_ledger():
    """One read API (Budget): the same names, all methods or all properties, same return types."""
    from pmixed.privacy.accountant import Budget, Receipt
    from pmixed.privacy.ledger import Ledger

    acc = RdpAccountant(epsilon=5.0, delta=DELTA)
    led = Ledger(":memory:", epsilon=5.0, delta=DELTA)
    c = gaussian_charge(4.0, count=2, label="g")
    for b in (acc, led):
        assert isinstance(b, Budget)
        r1, r2 = b.charge(c), b.compose(c)
        assert isinstance(r1, Receipt) and isinstance(r2, Receipt) and (r1.id, r2.id) == (1, 2)
    for name in ("orders", "epsilon", "delta", "rule"):
        assert getattr(acc, name) == getattr(led, name)
    for name in ("spent_rdp", "charges", "epsilon_spent", "remaining"):
        assert getattr(acc, name)() == getattr(led, name)()
    assert acc.epsilon_if(c) == led.epsilon_if(c) and acc.can_afford(c) == led.can_afford(c)
    assert acc.queries_left(c.rdp) == led.queries_left(c.rdp)
    strip = lambda h: [(r.id, r.count, r.label, r.rdp, r.epsilon_after) for r in h]  # noqa: E731
    assert strip(acc.history()) == strip(led.history()) and strip(acc.history(1)) == strip(led.history(1))
    led.close()


GRID = (2.0, 4.0, 8.0, 16.0, 32.0)
CHARGE_ORDERS = (2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@st.composite
def charges(draw):
    orders = draw(st.lists(st.sampled_from(CHARGE_ORDERS), min_size=1, max_size=len(CHARGE_ORDERS), unique=True))
    rdp = draw(
        st.lists(
            st.one_of(st.floats(0.0, 2.0), st.just(math.inf)),
            min_size=len(orders),
            max_size=len(orders),
        )
    )
    return RdpCharge(tuple(orders), tuple(rdp), draw(st.integers(1, 5)))


def _up(x: Fraction) -> float:
    """The smallest float >= x (an independent restatement of ``rounding.ceil_float``)."""
    f = float(x)
    return math.nextafter(f, math.inf) if Fraction(f) < x else f


@settings(max_examples=150, deadline=None)
@given(
    limit=st.floats(0.5, 30.0),
    delta=st.sampled_from([1e-3, 1e-5, 1e-9]),
    seq=st.lists(charges(), max_size=25),
)
def test_property_never_above_limit_and_accepted_sum_exactly(limit, delta, seq):
    """The totals are each step's exact sum rounded up to the next float, so never below the exact
    sum of what was accepted."""
    acc = RdpAccountant(GRID, epsilon=limit, delta=delta)
    expected = (0.0,) * len(GRID)
    exact = [Fraction(0)] * len(GRID)  # inf entries stay inf in ``expected``
    accepted = 0
    for c in seq:
        before = acc.spent_rdp()
        would = acc.epsilon_if(c)
        try:
            eps = acc.compose(c).epsilon_spent
        except BudgetExhausted as e:
            assert would > limit and e.requested == would and e.limit == limit
            assert acc.spent_rdp() == before and acc.charges() == accepted
        else:
            accepted += 1
            assert eps == would <= limit
            rdp = project_charge(c, GRID)
            expected = tuple(math.inf if math.isinf(s) or math.isinf(r) else _up(Fraction(s) + c.count * Fraction(r))
                             for s, r in zip(expected, rdp, strict=True))
            exact = [e if math.isinf(r) else e + c.count * Fraction(r) for e, r in zip(exact, rdp, strict=True)]
            assert acc.spent_rdp() == expected
            assert all(math.isinf(x) or Fraction(x) >= e for x, e in zip(expected, exact, strict=True))
        assert acc.epsilon_spent() <= limit
    assert acc.spent_rdp() == expected
    assert acc.charges() == accepted
    assert acc.epsilon_spent() == curve_epsilon(GRID, expected, delta)
