"""Scoring from block statistics equals the release of every single query."""

import pytest
import torch

from pmixed.mechanism.divergence import as_distribution
from pmixed.mechanism.release import release
from pmixed.mechanism.teacher_forcing import (
    BlockStats,
    binding_order,
    member_stats,
    released_target_probs,
)
from pmixed.privacy.params import MechanismParams


def test_equals_release_per_position():
    T, N, V = 12, 5, 40
    g = torch.Generator().manual_seed(0)
    public = torch.softmax(torch.randn(T, V, generator=g) * 2, -1)
    members = torch.softmax(torch.randn(N, T, V, generator=g) * 2, -1).float()
    targets = torch.randint(0, V, (T,), generator=g)
    p0 = as_distribution(public)
    mom, mt = member_stats(p0, members, targets, 4)
    stats = BlockStats(mom, mt, p0.gather(1, targets[:, None]).squeeze(1))
    params = MechanismParams(N, 0.4, 0.7, (0.3, 0.8, 2.0))
    mask = torch.rand(T, N, generator=g) < 0.4
    probs, lam = released_target_probs(stats, mask, params)
    for t in range(T):
        want = release(public[t], members[mask[t].nonzero().flatten(), t], params)[targets[t]]
        assert float(probs[t]) == pytest.approx(float(want), rel=1e-12)
    # a lower-order mechanism can reuse the same statistics
    low = MechanismParams(N, 0.4, 0.7, (0.3,))
    p_low, _ = released_target_probs(stats, mask, low)
    for t in range(T):
        want = release(public[t], members[mask[t].nonzero().flatten(), t], low)[targets[t]]
        assert float(p_low[t]) == pytest.approx(float(want), rel=1e-12)
    orders = binding_order(stats, mask, params)
    assert set(orders.tolist()) <= {1, 2, 3, 4}


def test_only_needed_pairs():
    T, N, V = 6, 3, 10
    g = torch.Generator().manual_seed(1)
    p0 = as_distribution(torch.softmax(torch.randn(T, V, generator=g), -1))
    members = torch.softmax(torch.randn(N, T, V, generator=g), -1)
    targets = torch.randint(0, V, (T,), generator=g)
    needed = torch.rand(T, N, generator=g) < 0.5
    mom, mt = member_stats(p0, members, targets, 3, needed)
    assert torch.isnan(mom[~needed]).all() and not torch.isnan(mom[needed]).any()
    full_mom, full_mt = member_stats(p0, members, targets, 3)
    assert torch.allclose(mt, full_mt)
    stats = BlockStats(mom, mt, p0.gather(1, targets[:, None]).squeeze(1))
    with pytest.raises(ValueError):
        released_target_probs(stats, ~needed, MechanismParams(N, 0.5, 0.5, (1.0, 1.0)))
