"""Poisson subsampling: independent inclusion, distinct members, CSPRNG by default."""

import torch

from pmixed.mechanism.subsample import poisson_draw, poisson_mask, sample_token


def test_seeded_draws_repeat():
    a = poisson_draw(80, 0.03, torch.Generator().manual_seed(1))
    b = poisson_draw(80, 0.03, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_distinct_sorted_and_rate():
    g = torch.Generator().manual_seed(2)
    m = poisson_mask(50, 0.2, positions=4000, generator=g)
    assert abs(m.float().mean().item() - 0.2) < 0.01
    # independence across members: pairwise inclusion ~ q^2
    both = (m[:, 0] & m[:, 1]).float().mean().item()
    assert abs(both - 0.04) < 0.01
    d = poisson_draw(50, 0.5, g)
    assert torch.equal(d, torch.unique(d))


def test_csprng_default():
    m = poisson_mask(100, 0.5, positions=200)
    assert 0.4 < m.float().mean().item() < 0.6
    assert poisson_mask(7, 1.0).all()


def test_sample_token():
    dist = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert sample_token(dist) == 2
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample_token(torch.tensor([0.2, 0.3, 0.5]), g)] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.2, 0.3, 0.5]), atol=0.03)
