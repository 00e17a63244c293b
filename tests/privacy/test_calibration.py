"""Calibration never overshoots the target; the inverse counts queries exactly."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.errors import ConfigError
from pmixed.privacy.calibration import (
    calibrate,
    epsilon_after,
    gaussian_abs_moment,
    max_queries,
    scale_of,
)
from pmixed.privacy.original_rules import reference_budget, solve_beta


def test_paper_setting_meets_target():
    cal = calibrate(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=80, sample_rate=0.03,
                    lam_max=0.75, tail=1.0)  # the shape of docs/privacy.md section 6's worked example
    assert cal.epsilon_after(1024) <= 8.0
    assert cal.epsilon_after(1024) > 7.99  # the budget is used, not wasted
    assert max_queries(cal.params, 8.0, 1e-5) == 1024
    # pinned (computed by this code, commit of docs/privacy.md section 5): order 4, scale t ~ 1.158
    assert cal.alpha == 4
    assert scale_of(cal.params) == pytest.approx(1.158, abs=1e-3)


def test_gaussian_moments():
    assert gaussian_abs_moment(2) == pytest.approx(1.0)
    assert gaussian_abs_moment(4) == pytest.approx(3.0)
    assert gaussian_abs_moment(3) == pytest.approx(2 * math.sqrt(2 / math.pi))


def test_reference_betas_pinned():
    # REFERENCE.md section 2: the original's beta for n = 1, 2, 3, 5, 10 at eps=8, a=3, T=1024, q=0.03
    per_query = reference_budget(8, 1e-5, 3) / 1024
    got = [solve_beta(3, 0.03, n, per_query) for n in (1, 2, 3, 5, 10)]
    assert got == pytest.approx([0.565, 0.194, 0.224, 0.258, 0.300], abs=1.5e-3)


@settings(max_examples=40, deadline=None)
@given(
    st.floats(0.5, 20),
    st.sampled_from([1e-6, 1e-5, 1e-3]),
    st.integers(1, 5000),
    st.integers(1, 200),
    st.floats(0.005, 1.0),
    st.one_of(st.none(), st.integers(2, 12)),
    st.floats(0.1, 0.95),
    st.floats(1.0, 30.0),
)
def test_never_overshoots(eps, delta, T, N, q, alpha, lam_max, tail):
    try:
        cal = calibrate(epsilon=eps, delta=delta, query_budget=T, ensemble_size=N, sample_rate=q,
                        alpha=alpha, lam_max=lam_max, tail=tail)
    except ConfigError:
        return  # infeasible at that order: refused, not miscalibrated
    assert epsilon_after(cal.params, T, delta) <= eps
    fit = max_queries(cal.params, eps, delta)
    assert fit >= T
    assert epsilon_after(cal.params, fit, delta) <= eps
    assert epsilon_after(cal.params, fit + 1, delta) > eps


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(ensemble_size=0), "ensemble_size"),
        (dict(alpha=1.0), "alpha"),
        (dict(query_budget=0), "query_budget"),
        (dict(sample_rate=1.0, lam_max=1.0), "lam_max"),
        (dict(tail=0.5), "tail"),
    ],
)
def test_invalid_inputs_name_the_field(kwargs, field):
    base = dict(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=80, sample_rate=0.03)
    base.update(kwargs)
    with pytest.raises(ConfigError) as err:
        calibrate(**base)
    assert err.value.field == field


def test_infeasible_order_is_refused():
    with pytest.raises(ConfigError, match="alpha"):
        calibrate(epsilon=0.5, delta=1e-5, query_budget=10, ensemble_size=10, sample_rate=0.1, alpha=2)
