"""The sparse-vector screen of screened PMixED (docs/privacy.md section 11, eq. (S1)-(S2)).

    score s_t = H(p_0(. | x_t)) + w / (q_s N) * sum_{i in S_r} g_i(x_t),   g_i = min(1, sqrt(a_2))

A round (AboveThreshold, Dwork & Roth 2014, Algorithm 1) draws its test subsample S_r
(Poisson q_s) and its threshold noise rho_r ~ Lap(2 Delta / eps_s) once; each query of the round
draws nu_t ~ Lap(4 Delta / eps_s) and is private iff s_t + nu_t >= theta + rho_r. The first
private query closes the round. Randomness: the OS CSPRNG unless a torch.Generator is given.
The parameters and the cost are in pmixed.privacy.screening.
"""

from __future__ import annotations

import math

import torch

from pmixed.mechanism.pairs import pair_moments, row_totals
from pmixed.mechanism.subsample import _csprng_uniform, poisson_mask
from pmixed.privacy.screening import ScreenParams

__all__ = ["Screen", "chi_square", "laplace", "member_score", "public_entropy"]


def public_entropy(public: torch.Tensor) -> torch.Tensor:
    """H(p_0) in nats of each row: public [..., V] (probabilities, any float) -> [...] float64.
    Renormalised in float64; 0 log 0 = 0. A function of public data only."""
    p = public.to(torch.float64)
    p = p / p.sum(dim=-1, keepdim=True)
    return -(torch.special.xlogy(p, p)).sum(dim=-1)


def member_score(a2: torch.Tensor) -> torch.Tensor:
    """g_i = min(1, sqrt(a_2(p_i))) in [0, 1] from the chi-square moment a_2 (eq. (B2), k = 2).
    An invalid member row (a_2 = inf or nan) scores 1, the largest value: still within (S2)."""
    g = torch.sqrt(a2.to(torch.float64)).clamp(max=1.0)
    return torch.where(torch.isnan(g), torch.ones_like(g), g)


def chi_square(public: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """a_2 of each member row against the public row (eq. (B2), k = 2): public [V], members
    [m, V] -> [m] float64, computed exactly as the projection computes it; an invalid member row
    gives inf (scored 1). The public row is validated (it may refuse: public data only)."""
    pub = public[None]  # [1, V]
    tot0 = row_totals(pub, "public")
    rows = torch.arange(members.shape[0], device=members.device)
    moments, _, _ = pair_moments(pub, tot0, members, torch.zeros_like(rows), rows, 2)
    return moments[:, 0]


def laplace(scale: float, generator: torch.Generator | None = None) -> float:
    """One Lap(scale) draw by inversion (0 when scale is 0), from the CSPRNG unless a generator."""
    if scale == 0.0:
        return 0.0
    u = _csprng_uniform((2,)) if generator is None else torch.rand(2, generator=generator, dtype=torch.float64)
    magnitude = -math.log1p(-float(u[0]))  # Exp(1): u in [0, 1) keeps it finite
    return scale * magnitude * (1.0 if float(u[1]) < 0.5 else -1.0)


class Screen:
    """The state of one stream of screened queries: the open round's test subsample and threshold
    noise. Never leaves the engine (like the Poisson draw)."""

    def __init__(self, params: ScreenParams, generator: torch.Generator | None = None):
        self.params = params
        self.generator = generator
        self.test_members: torch.Tensor = torch.zeros(0, dtype=torch.long)  # S_r, [m]
        self.test_weights: torch.Tensor = torch.zeros(params.ensemble_size, dtype=torch.float64)  # 1 on S_r, [N]
        self._rho = 0.0
        self._next: torch.Tensor | None = None  # S of the next round, when drawn ahead
        self.is_open = False

    def _subsample(self) -> torch.Tensor:
        p = self.params
        if not p.private:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(poisson_mask(p.ensemble_size, p.test_rate, None, self.generator)).flatten()

    def next_test_members(self) -> torch.Tensor:
        """The next round's S_r, drawn now (the same Poisson law, independent of everything else)
        so that its members can run before the round is paid for and opened; ``open_round`` then
        uses it. Nothing is released by drawing it."""
        if self.is_open:
            raise RuntimeError("a round is open: its test members are test_members")
        if self._next is None:
            self._next = self._subsample()
        return self._next

    def open_round(self) -> torch.Tensor:
        """Start a round: draw S_r (or take the one ``next_test_members`` drew) and rho_r. Returns
        S_r's member indices [m] (empty for a public screen: no member is read)."""
        p = self.params
        self.test_members = self._subsample() if self._next is None else self._next
        self._next = None
        self.test_weights = torch.zeros(p.ensemble_size, dtype=torch.float64).index_fill_(0, self.test_members, 1.0)
        self._rho = laplace(p.threshold_scale, self.generator)
        self.is_open = True
        return self.test_members

    def score(self, entropy: float, member_scores: torch.Tensor | None = None) -> float:
        """s_t of eq. (S1): entropy of p_0 (nats) + w / (q_s N) * sum of S_r's g_i."""
        p = self.params
        s = float(entropy)
        if p.private:
            if member_scores is None or member_scores.shape != self.test_members.shape:
                raise ValueError(f"the round's {self.test_members.numel()} test members need their scores")
            s += self._member_term(float(member_scores.to(torch.float64).sum()))
        return s

    def _member_term(self, total: float) -> float:
        """w / (q_s N) times the sum of S_r's g_i (eq. (S1))."""
        p = self.params
        return p.weight / (p.test_rate * p.ensemble_size) * total

    def score_every(self, entropy: float, every_score: torch.Tensor) -> float:
        """s_t of eq. (S1) from the scores of all N members [N], those outside S_r weighted 0:
        the same work whatever S_r is (constant-work serving computes every member's g_i)."""
        p = self.params
        if every_score.shape != (p.ensemble_size,):
            raise ValueError(f"expected the scores of all {p.ensemble_size} members, got {tuple(every_score.shape)}")
        weighted = float((every_score.to(torch.float64) * self.test_weights).sum())
        return float(entropy) + (self._member_term(weighted) if p.private else 0.0)

    def decide(self, entropy: float, member_scores: torch.Tensor | None = None, *,
               every_score: torch.Tensor | None = None) -> bool:
        """One query of the open round: True = private (the round closes), False = public. The
        members' scores come as S_r's (``member_scores`` [m]) or all N (``every_score`` [N],
        ``score_every``)."""
        if not self.is_open:
            raise RuntimeError("no open screen round: open_round() first (it is charged)")
        nu = laplace(self.params.query_scale, self.generator)
        s = self.score(entropy, member_scores) if every_score is None else self.score_every(entropy, every_score)
        private = s + nu >= self.params.threshold + self._rho
        if private:
            self.is_open = False
        return bool(private)
