"""The release: a distribution, deterministic, any float dtype, blocks equal single queries."""

import pytest
import torch

import pmixed
from pmixed.mechanism.release import release, release_rows
from pmixed.privacy.params import MechanismParams

PARAMS = MechanismParams(6, 0.4, 0.7, (0.5, 1.0, 3.0))


def dists(n, V, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, V, generator=g) * scale, -1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype(dtype):
    pub, mem = dists(1, 50, 0)[0].to(dtype), dists(3, 50, 1).to(dtype)
    out = release(pub, mem, PARAMS)
    assert out.dtype == torch.float64
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (out >= 0).all()


def test_deterministic_and_public_when_empty():
    pub, mem = dists(1, 40, 2)[0], dists(2, 40, 3)
    assert torch.equal(release(pub, mem, PARAMS), release(pub, mem, PARAMS))
    empty = release(pub, mem[:0], PARAMS)
    assert torch.allclose(empty, pub.double() / pub.double().sum(), atol=0, rtol=1e-15)


def test_bad_inputs():
    pub = dists(1, 10, 0)[0]
    with pytest.raises(ValueError):
        release(pub, dists(2, 11, 0), PARAMS)
    # invalid *member* rows are not errors (lam = 0, the public model answers: test_fused.py)
    p0 = pub.double() / pub.double().sum()
    torch.testing.assert_close(release(pub, -dists(2, 10, 0), PARAMS), p0, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(release(pub, torch.full((1, 10), float("nan")), PARAMS), p0, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError):
        release(torch.full((10,), float("nan")), dists(2, 10, 0), PARAMS)


def test_block_equals_separate_queries():
    P, V, N = 9, 30, PARAMS.ensemble_size
    pub = dists(P, V, 4)
    members = dists(N * P, V, 5).reshape(N, P, V)
    mask = torch.rand(P, N, generator=torch.Generator().manual_seed(6)) < 0.4
    pos, mem = torch.nonzero(mask, as_tuple=True)
    rows = members[mem, pos]
    block, lam = release_rows(pub, rows, pos, PARAMS)
    targets = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(7))
    picked, _ = release_rows(pub, rows, pos, PARAMS, targets=targets)
    for t in range(P):
        single = release(pub[t], members[mask[t].nonzero().flatten(), t], PARAMS)
        assert torch.allclose(block[t], single, rtol=1e-12, atol=1e-15)
        assert float(picked[t]) == pytest.approx(float(single[targets[t]]), rel=1e-12)
    assert lam.shape == (rows.shape[0],)


def test_public_contract():
    mech = pmixed.PMixED(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=80, sample_rate=0.03, alpha=None,
                         lam_max=0.75, tail=1.0)  # docs/privacy.md section 6's shape: orders 2..4
    g = torch.Generator().manual_seed(0)
    S = mech.draw(generator=g)
    assert S.dtype == torch.long and len(set(S.tolist())) == len(S) and all(0 <= i < 80 for i in S.tolist())
    pub, mem = dists(1, 100, 1)[0], dists(80, 100, 2)
    out = mech.release(pub, mem[S])
    assert out.shape == (100,) and float(out.sum()) == pytest.approx(1.0)
    rdp = mech.query_rdp([2, 3, 4, 100])
    assert rdp[3] == float("inf") and all(0 < r < 0.01 for r in rdp[:3])
    assert mech.epsilon_after(1024) <= 8.0
    assert mech.epsilon_after(2048) > 8.0
    assert mech.epsilon_after(0) == 0.0


@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_masked_release_equals_the_release_of_the_drawn_members(kernels, monkeypatch):
    """Constant-work serving computes every member and weights the undrawn ones 0."""
    from pmixed.mechanism.release import release_masked

    monkeypatch.setenv("PMIXED_KERNELS", kernels)
    N, V = PARAMS.ensemble_size, 30
    pub, mem = dists(1, V, 5)[0], dists(N, V, 6)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        drawn = torch.rand(N, generator=g) < 0.5
        want = release(pub, mem[drawn], PARAMS)
        torch.testing.assert_close(release_masked(pub, mem, drawn, PARAMS), want, rtol=1e-12, atol=1e-15)
    bad = mem.clone()
    bad[0, 2] = float("nan")  # an invalid member row: lam 0, as in release
    drawn = torch.ones(N, dtype=torch.bool)
    torch.testing.assert_close(release_masked(pub, bad, drawn, PARAMS), release(pub, bad, PARAMS),
                               rtol=1e-12, atol=1e-15)


def test_masked_release_does_the_same_work_whatever_the_draw():
    """Constant-work serving's release: the same aten ops on the same shapes for any draw (none,
    all, some), none of them a sort or search, and no subnormal float64 value made, on float32
    distributions with long tails (entries down to float32's subnormals and exact zeros): the
    draw-dependent part is the mix, whose inputs are normal in float64 and whose weights are 0 or
    at least ~1e-154 (lam from a finite moment). Releasing the drawn rows alone is caught."""
    from pmixed.mechanism.release import release_masked
    from tests.mechanism.test_sampling import DATA_DEPENDENT, _extreme, _subnormal, _trace

    N, V = PARAMS.ensemble_size, 2048
    pub = _extreme(5, V)
    mem = torch.stack([_extreme(10 + i, V, scale=40.0 if i % 2 else 3.0) for i in range(N)])
    g = torch.Generator().manual_seed(2)
    masks = [torch.zeros(N, dtype=torch.bool), torch.ones(N, dtype=torch.bool),
             *(torch.rand(N, generator=g) < 0.5 for _ in range(4))]
    traces = [_trace(release_masked, pub, mem, m, PARAMS) for m in masks]
    assert all(t.ops == traces[0].ops for t in traces[1:])
    assert not {name for name, _ in traces[0].ops} & DATA_DEPENDENT
    assert not any(_subnormal(v) for t in traces for v in t.values)
    drawn_only = [_trace(release, pub, mem[m], PARAMS) for m in masks[:2]]
    assert drawn_only[0].ops != drawn_only[1].ops  # the unsound variant's work follows the draw
