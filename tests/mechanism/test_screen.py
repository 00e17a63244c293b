"""The screen's pieces (mechanism/screen.py): the Laplace sampler the proof assumes, the public
score, the member score, and the round's state machine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pmixed.mechanism.screen import Screen, chi_square, laplace, member_score, public_entropy
from pmixed.privacy.screening import ScreenParams


def _draws(scale, n, generator):
    return np.array([laplace(scale, generator) for _ in range(n)])


@pytest.mark.parametrize("seeded", [True, False])
def test_laplace_has_the_scale_the_proof_assumes(seeded):
    g = torch.Generator().manual_seed(0) if seeded else None  # False: the OS CSPRNG
    x = _draws(0.7, 4000, g)
    assert stats.kstest(x, stats.laplace(scale=0.7).cdf).pvalue > 1e-6  # unseeded: fails once in a million
    # the same test rejects a sampler with half the noise (a sensitivity too small by half)
    assert stats.kstest(x / 2, stats.laplace(scale=0.7).cdf).pvalue < 1e-6
    assert laplace(0.0, g) == 0.0


def test_public_entropy_and_member_score():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float32)
    h = public_entropy(p)
    assert h.dtype == torch.float64
    assert float(h[0]) == pytest.approx(stats.entropy([0.5, 0.25, 0.25]), rel=1e-12) and float(h[1]) == 0.0
    a2 = torch.tensor([0.0, 0.25, 4.0, math.inf, math.nan], dtype=torch.float64)
    assert member_score(a2).tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]  # in [0, 1]: eq. (S2) holds


def test_chi_square_matches_its_definition():
    pub = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mem = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    want = [float(((m / pub - 1) ** 2 * pub).sum()) for m in mem]
    assert chi_square(pub, mem).tolist() == pytest.approx(want, rel=1e-12)
    assert math.isinf(float(chi_square(pub, torch.tensor([[0.5, 0.5, float("nan")]]))[0]))


def test_a_public_screen_is_the_threshold_rule():
    s = Screen(ScreenParams(4, threshold=1.0))
    assert s.open_round().numel() == 0  # no member is read
    assert s.decide(0.99) is False and s.is_open  # public answers keep the round open
    assert s.decide(1.0) is True and not s.is_open  # a private one closes it
    with pytest.raises(RuntimeError, match="open_round"):
        s.decide(2.0)


def test_a_private_screen_draws_its_test_members_once_per_round():
    g = torch.Generator().manual_seed(1)
    s = Screen(ScreenParams(20, threshold=-1e9, weight=1.0, svt_epsilon=1.0, test_rate=0.5), g)
    sizes = []
    for _ in range(200):
        ids = s.open_round()
        sizes.append(ids.numel())
        with pytest.raises(ValueError, match="test members"):
            s.decide(0.0, torch.zeros(ids.numel() + 1))
        assert s.decide(0.0, torch.zeros(ids.numel())) is True  # threshold -1e9: private
    assert 8.5 < sum(sizes) / len(sizes) < 11.5  # Poisson(0.5) over 20 members


def test_the_next_rounds_test_members_drawn_ahead_are_the_ones_it_uses():
    """``next_test_members`` draws S_r before the round is paid for and opened (the engine runs
    those members early); ``open_round`` takes that draw, once, and the law is unchanged."""
    g = torch.Generator().manual_seed(2)
    s = Screen(ScreenParams(20, threshold=-1e9, weight=1.0, svt_epsilon=1.0, test_rate=0.5), g)
    sizes = []
    for _ in range(200):
        ahead = s.next_test_members()
        assert torch.equal(s.next_test_members(), ahead)  # drawn once, not redrawn
        assert torch.equal(s.open_round(), ahead)
        with pytest.raises(RuntimeError, match="open"):
            s.next_test_members()
        sizes.append(ahead.numel())
        assert s.decide(0.0, torch.zeros(ahead.numel())) is True
        assert not torch.equal(s.open_round(), ahead) or ahead.numel() in (0, 20)  # not reused: a fresh draw
        s.decide(0.0, torch.zeros(s.test_members.numel()))
    assert 8.5 < sum(sizes) / len(sizes) < 11.5  # Poisson(0.5) over 20 members


def test_scoring_every_member_weighted_by_the_round_equals_scoring_the_round_and_does_the_same_work():
    """Constant-work serving scores all N members with those outside S_r weighted 0: the same s_t
    as S_r's scores alone, by the same operations on the same shapes whatever S_r is (scoring
    S_r's members alone works on |S_r| entries: caught)."""
    from tests.mechanism.test_sampling import _trace

    N = 20
    g = torch.Generator().manual_seed(4)
    every = torch.rand(N, generator=g, dtype=torch.float64)
    traces, gathered = [], []
    for seed in range(6):
        s = Screen(ScreenParams(N, threshold=-1e9, weight=1.0, svt_epsilon=1.0, test_rate=0.5),
                   torch.Generator().manual_seed(seed))
        s.open_round()
        assert float(s.test_weights.sum()) == s.test_members.numel()
        want = s.score(0.7, every[s.test_members])
        assert s.score_every(0.7, every) == pytest.approx(want, rel=1e-15, abs=1e-15)
        traces.append(_trace(s.score_every, 0.7, every).ops)
        gathered.append((s.test_members.numel(), _trace(lambda s=s: s.score(0.7, every[s.test_members])).ops))
    assert all(t == traces[0] for t in traces)
    sizes = {n for n, _ in gathered}
    assert len(sizes) > 1 and len({str(ops) for _, ops in gathered}) > 1  # the gathered variant's work follows S_r
    with pytest.raises(ValueError, match="all 20 members"):
        s.score_every(0.7, every[:3])
