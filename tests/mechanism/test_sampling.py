"""Post-processing of the released distribution: temperature, top-k, top-p."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.mechanism.sampling import postprocess, sample


def dist(seed, V=20):
    return torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2, -1)


def test_defaults_are_the_identity_and_temperature_is_a_power():
    d = dist(0)
    assert torch.equal(postprocess(d), d)
    t = postprocess(d, temperature=0.5)
    torch.testing.assert_close(t, d**2 / (d**2).sum(), rtol=1e-12, atol=1e-15)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 20), p=st.floats(0.01, 1.0))
def test_top_k_and_top_p_keep_the_most_likely_and_renormalise(seed, k, p):
    d = dist(seed)
    out = postprocess(d, top_k=k)
    assert int((out > 0).sum()) == k and out.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (out == 0).all() or float(d[out > 0].min()) >= float(torch.cat([d[out == 0], d.new_zeros(1)]).max())
    out = postprocess(d, top_p=p)
    kept = d[out > 0]
    assert kept.sum() >= p * (1 - 1e-12)  # enough mass ...
    assert kept.sum() - kept.min() < p  # ... and the smallest such set
    torch.testing.assert_close(out[out > 0], kept / kept.sum(), rtol=1e-12, atol=1e-15)


def test_greedy_and_bad_settings():
    d = dist(3)
    assert sample(d, top_k=1) == int(torch.argmax(d))
    for kw in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError):
            postprocess(d, **kw)


# ---------------------------------------------------------------- constant time (docs/privacy.md 8b)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pmixed.mechanism.subsample import sample_token  # noqa: E402

# kernels whose running time depends on the values they read (comparison sorts and selections,
# binary searches) or whose output shape does (so the work after them does too)
DATA_DEPENDENT = {"sort", "topk", "kthvalue", "argsort", "msort", "searchsorted", "bucketize", "nonzero",
                  "masked_select", "unique", "_unique2", "unique_consecutive", "median", "mode", "argwhere"}


def sort_based(dist, *, temperature=1.0, top_k=0, top_p=1.0, selection="sort"):
    """The sort-based post-processing (pmixed before this file's constant-time version): the same
    function of ``dist`` where sums are exact; its time depends on the values (the unsound variant).
    ``selection="topk"``: top-k by ``torch.topk`` as pmixed did (ties in no promised order)."""
    out = dist.to(torch.float64)
    if temperature != 1.0:
        out = torch.softmax(torch.log(out.clamp(min=1e-300)) / temperature, dim=-1)
    V = out.shape[-1]
    if 0 < top_k < V:
        keep = (torch.topk(out, top_k, sorted=False).indices if selection == "topk"
                else torch.sort(out, descending=True, stable=True).indices[:top_k])
        masked = torch.zeros_like(out)
        masked[keep] = out[keep]
        out = masked / masked.sum()
    if top_p < 1.0:
        vals, idx = torch.sort(out, descending=True, stable=True)
        cum = torch.cumsum(vals, dim=-1)
        n_keep = int(torch.searchsorted(cum, torch.tensor([top_p * float(out.sum())], dtype=torch.float64)).item()) + 1
        masked = torch.zeros_like(out)
        sel = idx[: min(n_keep, V)]
        masked[sel] = out[sel]
        out = masked / masked.sum()
    return out


def dyadic(counts):
    """A distribution of multiples of 2^-12 (every partial sum exact in float64), ties and zeros
    as ``counts`` has them."""
    c = torch.tensor(counts, dtype=torch.float64)
    return c / 2.0**12 if c.sum() > 0 else c


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=2, max_size=40).filter(lambda c: sum(c) > 0),
       k=st.integers(0, 45), p=st.sampled_from([0.01, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99, 1.0]))
def test_constant_time_top_k_and_top_p_equal_the_sort_based_ones(counts, k, p):
    """Ties are frequent here (values 0..6 / 4096): kept by index, lowest first, as a stable sort
    keeps them; sums are exact, so the two must agree bit for bit. Both kernel paths."""
    import os

    d = dyadic(counts)
    for path in ("fused", "torch"):
        os.environ["PMIXED_KERNELS"] = path
        try:
            for kw in ({"top_k": k}, {"top_p": p}):
                assert torch.equal(postprocess(d, **kw), sort_based(d, **kw)), (path, counts, kw)
            # both: top-k, then top-p on its renormalised output (no longer dyadic: compared
            # with the composition, which must be exact, not with sums in another order)
            both = postprocess(d, top_k=k, top_p=p)
            assert torch.equal(both, postprocess(postprocess(d, top_k=k), top_p=p))
        finally:
            os.environ.pop("PMIXED_KERNELS")


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.sampled_from([0.05, 0.3, 0.7, 1.5, 4.0, 50.0]))
def test_temperature_equals_the_softmax_of_scaled_logs(seed, t):
    d = dist(seed, V=64)
    d[::7] = 0.0  # zeros: clamped to 1e-300 before the log, as before
    d = d / d.sum()
    want = sort_based(d, temperature=t)
    got = postprocess(d, temperature=t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)
    x = torch.log(d.clamp(min=1e-300)) / t
    assert torch.equal(got == 0, (x - x.max()) <= -600)  # only what is below e^-600 of the largest


class _Trace(TorchDispatchMode):
    """Every aten op run: (name, argument shapes), and the float64 values it produced."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.values: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__,
                         tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float64:
                self.values.append(o.detach().clone())
        return out


def _trace(fn, *args, **kwargs) -> _Trace:
    with _Trace() as tr:
        fn(*args, **kwargs)
    return tr


def _extreme(seed, V=512, scale=40.0):
    """A float32 softmax with a long tail (entries down to float32's subnormals and exact zeros),
    widened to float64 as the engine hands it on."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, generator=g) * scale, -1).double()


def _subnormal(x: torch.Tensor) -> bool:
    return bool(((x != 0) & (x.abs() < torch.finfo(torch.float64).tiny)).any())


SETTINGS = [{}, {"temperature": 0.05}, {"temperature": 0.1}, {"temperature": 3.0}, {"top_k": 5}, {"top_p": 0.9},
            {"temperature": 0.7, "top_k": 40, "top_p": 0.95}]


@pytest.mark.parametrize("kw", SETTINGS)
def test_post_processing_and_sampling_do_the_same_work_for_any_distribution(kw, monkeypatch):
    """What runs, on what shapes, is the same for very different distributions (peaked, flat,
    ties, zeros), no op is a sort, selection or search, and no float64 value made is subnormal
    (slow arithmetic). Traced on the torch path (the fused kernels are fixed loops of 63 passes)."""
    monkeypatch.setenv("PMIXED_KERNELS", "torch")
    flat = torch.full((512,), 1 / 512, dtype=torch.float64)
    ties = dyadic([i % 3 for i in range(512)])
    traces = [_trace(sample, d, generator=torch.Generator().manual_seed(0), **kw)
              for d in (_extreme(0), _extreme(1, scale=2.0), flat, ties / ties.sum())]
    assert all(t.ops == traces[0].ops for t in traces[1:])
    assert not {name for name, _ in traces[0].ops} & DATA_DEPENDENT
    assert not any(_subnormal(v) for t in traces for v in t.values)


def test_the_sort_based_variant_is_caught():
    """The check above fails on the sort-based post-processing and a binary-search sampler."""
    tr = _trace(sort_based, _extreme(0), top_k=5, top_p=0.9)
    assert {name for name, _ in tr.ops} & DATA_DEPENDENT
    a, b = (_trace(sort_based, d, top_p=0.9) for d in (_extreme(0), _extreme(1, scale=2.0)))
    assert a.ops != b.ops  # the kept prefix's length sets shapes
    assert any(_subnormal(v) for v in _trace(sort_based, _extreme(0, V=4096), temperature=0.1).values)
    cdf = torch.cumsum(_extreme(0), 0)
    assert "searchsorted" in {n for n, _ in _trace(torch.searchsorted, cdf, cdf[-1:] / 2).ops}


def test_sample_token_counts_the_whole_cdf():
    tr = _trace(sample_token, _extreme(0), torch.Generator().manual_seed(0))
    assert not {name for name, _ in tr.ops} & DATA_DEPENDENT
    d = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)
    counts = [0] * 4
    g = torch.Generator().manual_seed(1)
    for _ in range(4000):
        counts[sample_token(d, g)] += 1
    assert counts[0] == counts[2] == 0 and 800 < counts[1] < 1200


def test_the_fused_sampler_inverts_the_same_cdf_as_torch(monkeypatch):
    d = _extreme(3, V=4096, scale=3.0)
    got = {}
    for path in ("fused", "torch"):
        monkeypatch.setenv("PMIXED_KERNELS", path)
        g = torch.Generator().manual_seed(5)
        got[path] = [sample_token(d, g) for _ in range(300)]
    assert got["fused"] == got["torch"]
    monkeypatch.setenv("PMIXED_KERNELS", "fused")
    assert sample_token(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) == 2


@pytest.mark.parametrize("kw", SETTINGS)
def test_the_fused_and_torch_paths_post_process_alike(kw, monkeypatch):
    for seed in range(3):
        d = _extreme(seed, V=4096, scale=3.0 + 10 * seed)
        monkeypatch.setenv("PMIXED_KERNELS", "fused")
        a = postprocess(d, **kw)
        monkeypatch.setenv("PMIXED_KERNELS", "torch")
        b = postprocess(d, **kw)
        assert torch.equal(a > 0, b > 0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
