"""The per-query RDP bound, eq. (R1)-(R3), against an independent high-precision evaluation."""

import math

import mpmath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.errors import ConfigError
from pmixed.privacy.mixture_bound import floor_weight, member_weight, query_rdp
from pmixed.privacy.params import MechanismParams


def oracle(alpha, N, q, lam_max, taus):
    """eq. (R3) at 50 digits, written from docs/privacy.md independently of the code."""
    mpmath.mp.dps = 50
    q = mpmath.mpf(q)
    none = (1 - q) ** N
    c = (1 - none) / N
    gamma = 1 - mpmath.mpf(lam_max) * (1 - none)
    s = mpmath.mpf(0)
    for k in range(2, alpha + 1):
        s += mpmath.binomial(alpha, k) * c**k * gamma ** (1 - k) * 2**k * mpmath.mpf(taus[k - 2])
    return float(mpmath.log1p(s) / (alpha - 1))


def test_member_weight_is_expected_inverse_count():
    # c = q E[1/(1+B)], B ~ Bin(N-1, q): brute force for N = 7
    N, q = 7, 0.3
    brute = sum(
        math.comb(N - 1, b) * q**b * (1 - q) ** (N - 1 - b) * q / (1 + b) for b in range(N)
    )
    assert member_weight(N, q) == pytest.approx(brute, rel=1e-14)
    assert member_weight(5, 1.0) == pytest.approx(1 / 5)


def test_floor_weight():
    assert floor_weight(4, 0.5, 0.6) == pytest.approx(1 - 0.6 * (1 - 0.5**4))
    assert floor_weight(3, 1.0, 0.75) == pytest.approx(0.25)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 100),
    st.floats(0.001, 1.0),
    st.floats(0.01, 0.99),
    st.lists(st.floats(0.0, 1e3), min_size=1, max_size=7),
)
def test_matches_oracle(N, q, lam_max, taus):
    p = MechanismParams(N, q, lam_max, tuple(taus))
    for a in range(2, p.max_order + 1):
        assert query_rdp(a, p) == pytest.approx(oracle(a, N, q, lam_max, taus), rel=1e-9, abs=1e-300)


def test_orders_outside_the_claim():
    p = MechanismParams(10, 0.1, 0.5, (0.1, 0.2, 0.3))  # enforced up to order 4
    assert query_rdp(5, p) == math.inf
    assert query_rdp(math.inf, p) == math.inf
    assert query_rdp(2.5, p) == query_rdp(3, p)  # monotone in the order: next integer bounds it
    assert query_rdp(1.5, p) == query_rdp(2, p)
    with pytest.raises(ConfigError):
        query_rdp(1.0, p)


def test_no_floor_means_no_claim():
    p = MechanismParams(3, 1.0, 1.0, (0.1,))
    assert query_rdp(2, p) == math.inf


@given(st.floats(0.01, 0.99), st.floats(0.001, 1.0))
def test_monotone_in_radius_and_rate(lam_max, q):
    small = MechanismParams(20, q, lam_max, (0.1, 0.1))
    big = MechanismParams(20, q, lam_max, (0.2, 0.2))
    assert query_rdp(3, small) <= query_rdp(3, big)
