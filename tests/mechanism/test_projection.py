"""The projection enforces exactly (B1)-(B2) at every order, and is the largest such weight."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.mechanism.divergence import abs_moments, as_distribution, renyi_divergence
from pmixed.mechanism.projection import MARGIN, mixing_weights, project
from pmixed.privacy.params import MechanismParams


def moments_by_hand(p0, p, K):
    return [float(sum(a * abs(b / a - 1) ** k for a, b in zip(p0.tolist(), p.tolist()))) for k in range(2, K + 1)]


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 50),
    st.integers(0, 2**31 - 1),
    st.floats(0.05, 1.0),
    st.lists(st.floats(1e-6, 50.0), min_size=1, max_size=6),
    st.floats(0.1, 8.0),
)
def test_ball_holds_and_is_tight(V, seed, lam_max, taus, spread):
    g = torch.Generator().manual_seed(seed)
    p0 = as_distribution(torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * spread, -1))
    p = as_distribution(torch.softmax(torch.randn(3, V, generator=g, dtype=torch.float64) * spread, -1))
    params = MechanismParams(10, 0.1, lam_max, tuple(taus))
    lam = mixing_weights(p0.unsqueeze(0), p, params)
    pbar = project(p0.unsqueeze(0), p, lam)
    for i in range(3):
        li = float(lam[i])
        assert 0.0 <= li <= lam_max
        got = moments_by_hand(p0, pbar[i], params.max_order)
        for k, (m, tau) in enumerate(zip(got, taus), start=2):
            assert m <= tau * (1 + 1e-9), f"order {k}: {m} > {tau}"
        # maximal: a slightly larger weight breaks the cap or some order's radius
        if li < lam_max * (1 - 2 * MARGIN):
            bigger = li * (1 + 1e-6)
            mixed = bigger * p[i] + (1 - bigger) * p0
            assert any(m > tau for m, tau in zip(moments_by_hand(p0, mixed, params.max_order), taus))


def test_moments_match_definition():
    p0 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    got = abs_moments(p0, p, 4).tolist()
    assert got == pytest.approx(moments_by_hand(p0, p, 4), rel=1e-14)


def test_mass_outside_public_support_forces_public():
    p0 = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([[0.4, 0.4, 0.2], [0.6, 0.4, 0.0]], dtype=torch.float64)
    params = MechanismParams(4, 0.5, 0.9, (1.0, 1.0))
    lam = mixing_weights(p0.unsqueeze(0), p, params)
    assert lam[0] == 0.0
    assert lam[1] > 0.0
    assert not torch.isnan(lam).any()


def test_identical_member_gets_the_cap():
    p0 = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    lam = mixing_weights(p0.unsqueeze(0), p0.unsqueeze(0), MechanismParams(4, 0.5, 0.6, (0.1,)))
    assert float(lam[0]) == pytest.approx(0.6, rel=1e-8)
    assert float(lam[0]) <= 0.6


def test_renyi_divergence_log_space():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    d = renyi_divergence(p, q, [2, 3])
    for j, a in enumerate([2, 3]):
        want = math.log(sum(pi**a * qi ** (1 - a) for pi, qi in zip(p.tolist(), q.tolist()))) / (a - 1)
        assert float(d[j]) == pytest.approx(want, rel=1e-13)
    assert float(renyi_divergence(p, torch.tensor([0.5, 0.5, 0.0]), [2])[0]) == math.inf
    # tiny probabilities do not underflow to nan in log space
    tiny = torch.tensor([1 - 1e-300, 1e-300], dtype=torch.float64)
    assert torch.isfinite(renyi_divergence(tiny, torch.tensor([0.5, 0.5], dtype=torch.float64), [4])).all()
