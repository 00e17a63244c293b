"""The screen's cost (eq. (S3)), the Renyi filter rule, and the adaptive calibration
(docs/privacy.md section 11)."""

from __future__ import annotations

import math

import mpmath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.errors import BudgetExhausted, ConfigError
from pmixed.privacy.acceptance import BEST_ORDER, RenyiFilterRule, rule_named
from pmixed.privacy.accountant import RdpAccountant
from pmixed.privacy.conversion import epsilon_at_order, rdp_budget
from pmixed.privacy.ledger import Ledger
from pmixed.privacy.mixture_bound import query_rdp
from pmixed.privacy.screening import (
    ScreenParams,
    adaptive_charge,
    adaptive_from_record,
    calibrate_adaptive,
    round_rdp,
)


def test_a_public_screen_costs_nothing_and_needs_no_noise():
    s = ScreenParams(8, threshold=2.0)
    assert not s.private and s.sensitivity == 0.0 and s.threshold_scale == 0.0 and s.query_scale == 0.0
    assert all(round_rdp(a, s) == 0.0 for a in (2, 5, 32))


def test_sensitivity_and_noise_scales():
    # pinned: Delta = w / (q_s N) (eq. (S2)), AboveThreshold's scales 2 Delta / eps and 4 Delta / eps
    s = ScreenParams(10, threshold=1.0, weight=2.0, svt_epsilon=0.5, test_rate=0.25)
    assert s.sensitivity == pytest.approx(0.8)
    assert s.threshold_scale == pytest.approx(3.2)
    assert s.query_scale == pytest.approx(6.4)
    with pytest.raises(ConfigError, match="screen_epsilon"):
        ScreenParams(10, threshold=1.0, weight=1.0, svt_epsilon=0.0)


@given(eps=st.floats(1e-4, 5.0), qs=st.floats(1e-3, 1.0), a=st.integers(2, 64))
@settings(max_examples=200, deadline=None)
def test_round_cost_is_the_smaller_of_two_bounds(eps, qs, a):
    s = ScreenParams(4, threshold=0.0, weight=1.0, svt_epsilon=eps, test_rate=qs)
    mpmath.mp.dps = 50  # the reference without cancellation
    r = mpmath.mpf(qs) * mpmath.expm1(eps)
    pure = float(mpmath.log1p(r))  # amplified pure epsilon, log(1 + q_s (e^eps - 1))
    expansion = float(mpmath.log((1 + r) ** a - a * r) / (a - 1))
    got = round_rdp(a, s)
    assert got >= min(pure, expansion) * (1 - 1e-9)
    assert got <= min(pure, expansion) * (1 + 1e-9) + 1e-300
    assert got <= eps * (1 + 1e-9)  # never above the un-amplified pure epsilon
    if a > 2:
        assert got >= round_rdp(a - 1, s) * (1 - 1e-12)  # non-decreasing in the order


def test_round_cost_pinned_small_rate():
    # r = 0.01 (e - 1); order 2: log(1 + r^2) exactly (the expansion's only term)
    s = ScreenParams(4, threshold=0.0, weight=1.0, svt_epsilon=1.0, test_rate=0.01)
    r = 0.01 * math.expm1(1.0)
    assert round_rdp(2, s) == pytest.approx(math.log1p(r * r), rel=1e-11)


def test_filter_rule_reads_one_order_only():
    rule = RenyiFilterRule(8)
    orders = (2.0, 4.0, 8.0, 16.0)
    curve = (100.0, 100.0, 0.5, 100.0)
    assert rule.epsilon(orders, curve, 1e-5) == pytest.approx(epsilon_at_order(0.5, 8, 1e-5))
    assert rule.epsilon(orders, (1.0, 1.0, 0.0, 1.0), 1e-5) == 0.0
    with pytest.raises(ConfigError, match="not in the budget's grid"):
        rule.check_orders((2.0, 3.0))
    assert rule_named("renyi-filter/alpha=8") == rule
    assert rule_named("renyi-filter/alpha=8") != BEST_ORDER
    assert rule.name == "renyi-filter/alpha=8"


def test_filter_stops_before_the_budget_and_best_order_would_not():
    """The filter refuses the unit that would cross rho(alpha) even when another order would
    still certify epsilon (the best-order rule's after-the-fact choice is not a filter)."""
    s = ScreenParams(16, threshold=1.0)
    cal = calibrate_adaptive(epsilon=2.0, delta=1e-5, private_queries=40, ensemble_size=16, sample_rate=0.5,
                             screen=s, tail=3.0)
    p = cal.params
    acc = RdpAccountant(epsilon=2.0, delta=1e-5, rule=RenyiFilterRule(p.order))
    n = 0
    with pytest.raises(BudgetExhausted):
        for _ in range(10_000):
            acc.charge(adaptive_charge(p, 1, acc.orders))
            n += 1
    assert n == cal.units_left(0.0) >= 40
    assert acc.spent_rdp()[acc.orders.index(float(p.order))] <= rdp_budget(2.0, 1e-5, p.order)
    assert acc.epsilon_spent() <= 2.0


@given(eps=st.floats(0.5, 10.0), units=st.integers(1, 5000), N=st.integers(2, 100),
       q=st.floats(0.01, 1.0), w=st.sampled_from([0.0, 1.0]), alpha=st.sampled_from([None, 4, 8]))
@settings(max_examples=40, deadline=None)
def test_calibration_never_overshoots(eps, units, N, q, w, alpha):
    s = ScreenParams(N, threshold=1.0, weight=w, svt_epsilon=0.01 if w else 0.0, test_rate=0.5)
    lam_max = 0.75 if q >= 1.0 else 0.9
    try:
        cal = calibrate_adaptive(epsilon=eps, delta=1e-5, private_queries=units, ensemble_size=N, sample_rate=q,
                                 screen=s, alpha=alpha, lam_max=lam_max)
    except ConfigError:
        return
    p = cal.params
    assert units * p.unit_rdp(p.order) <= rdp_budget(eps, 1e-5, p.order)
    assert epsilon_at_order(units * p.unit_rdp(p.order), p.order, 1e-5) <= eps
    assert p.unit_rdp(p.order) == pytest.approx(round_rdp(p.order, s) + query_rdp(p.order, p.release))
    assert cal.units_left(0.0) >= units
    k = cal.units_left(0.0)
    assert (k + 1) * p.unit_rdp(p.order) > cal.rdp_budget


def test_charge_records_replay_to_the_same_curve():
    s = ScreenParams(8, threshold=1.5, weight=0.5, svt_epsilon=0.05, test_rate=0.5)
    cal = calibrate_adaptive(epsilon=4.0, delta=1e-5, private_queries=20, ensemble_size=8, sample_rate=0.5, screen=s)
    c = adaptive_charge(cal.params, 3, (2.0, 3.0, 8.0, 40.0), "x")
    again = adaptive_from_record(dict(c.params))
    assert again == cal.params
    assert c.rdp == tuple(again.unit_rdp(a) for a in c.orders)
    assert c.mechanism == "pmixed/adaptive" and c.count == 3


def test_ledger_under_the_filter_reopens_with_it_and_refuses_another_rule(tmp_path):
    path = tmp_path / "f.ledger"
    s = ScreenParams(8, threshold=1.5)
    cal = calibrate_adaptive(epsilon=2.0, delta=1e-5, private_queries=5, ensemble_size=8, sample_rate=0.5, screen=s)
    rule = RenyiFilterRule(cal.order)
    with Ledger(path, epsilon=2.0, delta=1e-5, rule=rule) as led:
        led.charge(adaptive_charge(cal.params, 2, led.orders))
        spent = led.epsilon_spent()
    with Ledger(path) as led:  # adopts the recorded rule by its name
        assert led.rule == rule and led.epsilon_spent() == spent
    with pytest.raises(Exception, match="acceptance rule"):
        Ledger(path, rule=BEST_ORDER)
