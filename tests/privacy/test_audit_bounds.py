"""Eqs. (A1)-(A3) (privacy/audit_bounds.py): the incomplete beta function and Clopper-Pearson
bounds against scipy, and the bound's coverage on a mechanism whose epsilon is known exactly
(randomised response), with an unsound variant (point estimates instead of confidence bounds)
that the same check catches."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from pmixed.errors import ConfigError
from pmixed.privacy.audit_bounds import (
    betainc,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lower_bound,
)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.05, 5000), st.floats(0.05, 5000), st.floats(0.0, 1.0))
def test_betainc_matches_scipy(a, b, x):
    assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), abs=1e-10)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.data(), st.sampled_from([0.0125, 0.025, 0.05, 0.2]))
def test_clopper_pearson_matches_scipy(n, data, beta):
    k = data.draw(st.integers(0, n))
    lo, hi = clopper_pearson_lower(k, n, beta), clopper_pearson_upper(k, n, beta)
    want_lo = 0.0 if k == 0 else float(stats.beta.ppf(beta, k, n - k + 1))
    want_hi = 1.0 if k == n else float(stats.beta.ppf(1 - beta, k + 1, n - k))
    assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)
    assert lo <= k / n <= hi


def test_pinned_bound():
    # n1 = n0 = 2000, tp = 1900, fp = 0, beta = 0.0125 each:
    # TPR_lo = BetaInv(0.0125; 1900, 101), FPR_hi = 1 - 0.0125^(1/2000) (scipy), eq. (A3)
    tpr = float(stats.beta.ppf(0.0125, 1900, 101))
    fpr = 1 - 0.0125 ** (1 / 2000)
    assert epsilon_lower_bound(1900, 2000, 0, 2000, 1e-5, 0.0125) == pytest.approx(math.log((tpr - 1e-5) / fpr), rel=1e-9)
    assert epsilon_lower_bound(10, 2000, 10, 2000, 1e-5, 0.0125) == 0.0  # no signal, no bound
    with pytest.raises(ConfigError):
        epsilon_lower_bound(3, 2, 0, 2, 1e-5, 0.05)


def _rr_bounds(eps: float, n: int, reps: int, seed: int, point_estimate: bool) -> list[float]:
    """Randomised response at epsilon (the truth with probability e^eps / (1 + e^eps)): the
    test "output is 1" has TPR / FPR = e^eps exactly, the tightest any eps-DP test can be."""
    rng = random.Random(seed)
    p = math.exp(eps) / (1 + math.exp(eps))
    out = []
    for _ in range(reps):
        tp = sum(rng.random() < p for _ in range(n))
        fp = sum(rng.random() < 1 - p for _ in range(n))
        if point_estimate:
            out.append(math.log(max(tp, 1) / n / (max(fp, 1) / n)))
        else:
            out.append(epsilon_lower_bound(tp, n, fp, n, 0.0, 0.025))
    return out


def test_coverage_on_randomised_response_and_the_unsound_variant_is_caught():
    """At confidence 0.95 the bound exceeds the true epsilon in at most about 5% of repetitions
    on the tightest eps-DP mechanism; reading the bound off point estimates exceeds it about
    half of the time, and this check catches that."""
    eps, reps = 1.0, 400
    sound = _rr_bounds(eps, 300, reps, 0, point_estimate=False)
    assert sum(b > eps for b in sound) / reps <= 0.05
    assert sum(sound) / reps > 0.5  # and it is not vacuous: the bound sees most of the truth
    unsound = _rr_bounds(eps, 300, reps, 1, point_estimate=True)
    assert sum(b > eps for b in unsound) / reps > 0.2
