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
