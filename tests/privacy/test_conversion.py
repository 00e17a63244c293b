"""RDP -> (epsilon, delta) conversion, eq. (C1)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmixed.errors import ConfigError
from pmixed.privacy.conversion import epsilon_at_order, rdp_budget, rdp_to_epsilon


def test_reference_worked_example():
    # REFERENCE.md section 2: eps=8, delta=1e-5, a=3 gives eps_RDP = 3.1983 (per query 0.0031233 at T=1024)
    rho = rdp_budget(8.0, 1e-5, 3)
    assert rho == pytest.approx(3.1983, abs=1e-4)
    assert rho / 1024 == pytest.approx(0.0031233, abs=1e-7)


def test_formula_by_hand():
    # rho + log((a-1)/a) - (log delta + log a)/(a-1) at a=4, rho=1, delta=1e-5
    want = 1 + math.log(3 / 4) - (math.log(1e-5) + math.log(4)) / 3
    assert epsilon_at_order(1.0, 4, 1e-5) == pytest.approx(want, rel=1e-15)


def test_best_order_and_no_claim():
    eps, order = rdp_to_epsilon([2, 3, 4], [math.inf, 1.0, 5.0], 1e-5)
    assert order == 3
    assert eps == pytest.approx(epsilon_at_order(1.0, 3, 1e-5))
    assert rdp_to_epsilon([2, 3], [math.inf, math.inf], 1e-5)[0] == math.inf


@given(st.floats(0.1, 50), st.floats(1e-12, 0.5), st.integers(2, 256))
def test_budget_inverts_conversion(eps, delta, order):
    rho = rdp_budget(eps, delta, order)
    assert epsilon_at_order(rho, order, delta) == pytest.approx(eps, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan")])
def test_bad_delta(delta):
    with pytest.raises(ConfigError, match="delta"):
        rdp_budget(1.0, delta, 3)
