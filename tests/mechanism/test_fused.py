"""The fused CPU kernels (mechanism/fused.py) agree with the torch reference (divergence.py,
projection.py) on every quantity the mechanism uses, validate inputs the same way, and handle
the edge cases (zeros of p_0, mass outside p_0's support, K > 4) exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.mechanism import fused
from pmixed.mechanism.pairs import pair_moments, row_totals, use_fused
from pmixed.mechanism.projection import lambdas_from_moments
from pmixed.mechanism.release import release, release_rows
from pmixed.mechanism.teacher_forcing import member_stats
from pmixed.privacy.params import MechanismParams

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")


def params(K: int = 4, lam_max: float = 0.75) -> MechanismParams:
    return MechanismParams(ensemble_size=8, sample_rate=0.3, lam_max=lam_max,
                           radii=tuple(0.05 * k for k in range(2, K + 1)))


def both(fn, monkeypatch):
    """fn() with the fused kernels, then with the torch reference."""
    monkeypatch.delenv("PMIXED_KERNELS", raising=False)
    assert fused.enabled()
    a = fn()
    monkeypatch.setenv("PMIXED_KERNELS", "torch")
    assert not fused.enabled()
    b = fn()
    monkeypatch.delenv("PMIXED_KERNELS")
    return a, b


def dists(gen, shape, scale=2.0, dtype=torch.float32, zeros=0):
    p = torch.softmax(torch.randn(shape, generator=gen) * scale, dim=-1)
    if zeros:
        p[..., :zeros] = 0.0
    return (p * 1.3).to(dtype)  # unnormalised on purpose: the kernels renormalise


def test_use_fused_only_for_cpu_float():
    x = torch.ones(2, 3)
    assert use_fused(x) and use_fused(x.double())
    assert not use_fused(x.half())


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_moments_match_reference(K, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(K)
    pub = dists(gen, (5, 300), dtype=dtype)
    mem = dists(gen, (7, 300), scale=3.0, dtype=dtype)
    pos = torch.tensor([0, 0, 1, 3, 3, 4, 2])  # unsorted on purpose
    rows = torch.tensor([6, 1, 2, 3, 4, 5, 0])

    def run():
        tot = row_totals(pub, "public")
        mom, mt, _ = pair_moments(pub, tot, mem, pos, rows, K)
        return tot, mom, mt, lambdas_from_moments(mom, params(K))

    (t1, m1, mt1, l1), (t2, m2, mt2, l2) = both(run, monkeypatch)
    torch.testing.assert_close(t1, t2, rtol=1e-13, atol=0)
    torch.testing.assert_close(mt1, mt2, rtol=1e-13, atol=0)
    torch.testing.assert_close(m1, m2, rtol=1e-11, atol=0)
    torch.testing.assert_close(l1, l2, rtol=1e-11, atol=0)
    assert bool((m1 > 0).all()) and bool(torch.isfinite(m1).all())


def test_zeros_of_public_are_exact(monkeypatch):
    """p_0(y) = 0 with p_i(y) = 0: no contribution; with p_i(y) > 0: a_k = inf, lam = 0."""
    gen = torch.Generator().manual_seed(1)
    pub = dists(gen, (1, 50), zeros=5)
    inside = dists(gen, (1, 50), zeros=5)
    outside = dists(gen, (1, 50), zeros=2)
    mem = torch.cat([inside, outside])

    def run():
        tot = row_totals(pub, "public")
        return pair_moments(pub, tot, mem, torch.zeros(2, dtype=torch.long), torch.arange(2), 4)[0]

    a, b = both(run, monkeypatch)
    torch.testing.assert_close(a[0], b[0], rtol=1e-11, atol=0)
    assert bool(torch.isfinite(a[0]).all())
    assert bool(torch.isinf(a[1]).all()) and bool(torch.isinf(b[1]).all())
    lam = lambdas_from_moments(a, params())
    assert lam[1] == 0.0 and 0 < lam[0] <= 0.75


def test_identical_member_gets_lam_max_and_zero_moments():
    pub = torch.softmax(torch.randn(1, 64), -1)
    tot = row_totals(pub, "public")
    mom, _, _ = pair_moments(pub, tot, pub.clone(), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 4)
    assert float(mom.abs().max()) < 1e-12
    assert float(lambdas_from_moments(mom, params(lam_max=0.6))) == pytest.approx(0.6 * (1 - 1e-9), rel=0, abs=1e-15)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 5), V=st.integers(2, 40), seed=st.integers(0, 10_000),
       scale=st.floats(0.1, 6.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_release_matches_reference(m, V, seed, scale, dtype):
    gen = torch.Generator().manual_seed(seed)
    pub = dists(gen, (V,), dtype=dtype)
    mem = dists(gen, (m, V), scale=scale, dtype=dtype)
    p = params()
    a = release(pub, mem, p)
    import os
    os.environ["PMIXED_KERNELS"] = "torch"
    try:
        b = release(pub, mem, p)
    finally:
        del os.environ["PMIXED_KERNELS"]
    assert a.dtype == torch.float64 and a.shape == (V,)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert abs(float(a.sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("with_targets", [True, False])
def test_release_rows_and_member_stats_match_reference(with_targets, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    P, V, N = 6, 200, 4
    pub = dists(gen, (P, V))
    members = dists(gen, (N, P, V), scale=3.0)
    mask = torch.rand(P, N, generator=gen) < 0.5
    pos, mem = mask.nonzero(as_tuple=True)
    rows = members[mem, pos]  # [R, V]
    targets = torch.randint(0, V, (P,), generator=gen)
    p = params()

    def run():
        rel, lam = release_rows(pub, rows, pos, p, targets=targets if with_targets else None)
        mom, mt = member_stats(pub, members, targets, 4, mask)
        return rel, lam, mom, mt

    (r1, l1, m1, t1), (r2, l2, m2, t2) = both(run, monkeypatch)
    torch.testing.assert_close(r1, r2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(l1, l2, rtol=1e-11, atol=0)
    torch.testing.assert_close(m1, m2, rtol=1e-11, atol=0, equal_nan=True)
    torch.testing.assert_close(t1, t2, rtol=1e-13, atol=0)
    assert bool(torch.isnan(m1[~mask]).all()) and not bool(torch.isnan(m1[mask]).any())


@pytest.mark.parametrize(
    "bad, message",
    [(float("nan"), "finite, non-negative"), (float("inf"), "finite, non-negative"),
     (-1e-30, "finite, non-negative"), (None, "zero total mass")],
)
@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_bad_member_rows_get_lam_zero_and_bad_public_rows_are_refused(bad, message, kernels, monkeypatch):
    """A member row is private: whether it is valid must not decide whether the query errors (an
    uncharged probe of which member was drawn). It gets lam = 0 (pbar = p_0) and the query is
    answered; only the public row, a function of public data, may refuse. On 92fb559 the member
    cases raised ValueError."""
    monkeypatch.setenv("PMIXED_KERNELS", kernels)
    pub = torch.softmax(torch.randn(10, generator=torch.Generator().manual_seed(0)), -1)
    mem = torch.softmax(torch.randn(2, 10, generator=torch.Generator().manual_seed(1)), -1)
    if bad is None:
        mem[1] = 0.0
    else:
        mem[1, 3] = bad
    p0 = pub.double() / pub.double().sum()
    out = release(pub, mem, params())
    # member 1 answers with p_0: M = (pbar_0 + p_0) / 2, pbar_0 the release of member 0 alone
    torch.testing.assert_close(out, (release(pub, mem[:1], params()) + p0) / 2, rtol=1e-12, atol=1e-15)
    rows, lam = release_rows(pub[None].expand(2, -1).contiguous(), mem, torch.tensor([0, 1]), params())
    assert lam[1] == 0.0 and lam[0] > 0
    torch.testing.assert_close(rows[1], p0, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rows[0], release(pub, mem[:1], params()), rtol=1e-12, atol=1e-15)
    tgt, _ = release_rows(pub[None].expand(2, -1).contiguous(), mem, torch.tensor([0, 1]), params(),
                          targets=torch.tensor([2, 3]))
    torch.testing.assert_close(tgt, torch.stack([rows[0, 2], rows[1, 3]]), rtol=1e-12, atol=1e-15)
    bad_pub = mem[1].clone()
    with pytest.raises(ValueError, match=message):
        release(bad_pub, mem[:1], params())
    with pytest.raises(ValueError, match=message):
        release_rows(bad_pub[None], mem[:1], torch.tensor([0]), params())


@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_out_of_range_positions_are_refused(kernels, monkeypatch):
    """The compiled kernels do not bounds-check; the wrapper must."""
    monkeypatch.setenv("PMIXED_KERNELS", kernels)
    pub = torch.softmax(torch.randn(3, 10), -1)
    mem = torch.softmax(torch.randn(2, 10), -1)
    with pytest.raises(IndexError):
        release_rows(pub, mem, torch.tensor([0, 3]), params())
    with pytest.raises(IndexError):
        release_rows(pub, mem, torch.tensor([-1, 0]), params())
    with pytest.raises(IndexError):
        pair_moments(pub, row_totals(pub, "public"), mem, torch.tensor([0, 1]), torch.tensor([0, 2]), 4)
