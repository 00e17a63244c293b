"""An empirical privacy audit of PMixED's releases (docs/privacy.md section 13).

The game. D is the trained ensemble; D' is D with one part replaced by a poisoned one whose
member is a *canary*: at every query position t it puts all its mass on one token y*_t (a part
can be made to train any member, so D' is a neighbour under replace-one-part). A session is T
queries at fixed public positions (contexts sampled from the public model alone; the guarantee
covers any contexts, chosen adaptively or not), each answered by the real mechanism: a Poisson
draw, the drawn members' releases, one sampled token. The auditor sees only whether each
token was y*_t (a post-processing of the tokens) and runs the likelihood-ratio test of D
against D' on those T bits; over many sessions in each world, the test's hits give an epsilon
lower bound by eq. (A3) (privacy/audit_bounds.py) to set against the epsilon claimed for T
queries. A mechanism that is (epsilon, delta)-DP cannot give a bound above its epsilon except
with probability at most the confidence level's complement; the tests keep an unsound variant
(no ball) that does.

How the sessions are simulated. The release of a draw S is the mean of the drawn members'
pbar_j (eq. (M1)), each pbar_j a function of member j alone (eq. (P1)), so the probability of
y*_t under a draw is the mean over S of a_j,t = release({j})[y*_t], and p_0's share when S is
empty. ``position_rates`` computes a_j,t with the library's own ``release`` on one member at a
time (and the canary's a'_t the same way) and checks, on random draws with several members,
that ``release`` of the whole draw, and ``release_masked`` (constant-work serving's path), give
the mean: the simulation is of the released mechanism, not of a model of it. Sessions then draw masks and Bernoulli tokens in bulk.

Choosing y*_t reads the public row only: among tokens at log-spaced ranks of p_0, the one whose
canary moves the release most per unit noise, (c (a' - p_0))^2 / p_0 (a chi-square score; any
public rule gives a valid bound).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from pmixed.errors import ConfigError
from pmixed.mechanism.release import release, release_masked
from pmixed.privacy.audit_bounds import epsilon_lower_bound
from pmixed.privacy.mixture_bound import member_weight
from pmixed.privacy.params import MechanismParams

#: Release probabilities of the same draw computed two ways must agree to this (float64 sums).
MATCH_TOL = 1e-9


class AuditMismatch(AssertionError):
    """``release`` of a draw differed from the mean of its members' single releases: the audit's
    simulation would not be of the mechanism (never expected for eq. (M1))."""


@dataclass(frozen=True)
class PositionRates:
    """Per query position t (T positions, N members): the canary token y*_t [T], p_0's own
    probability of it after the release's renormalisation (an empty draw) [T], a_j,t under D
    [T, N] and the canary's a'_t [T] (member ``member`` replaced under D')."""

    tokens: torch.Tensor  # [T] long
    empty: torch.Tensor  # [T] float64
    kept: torch.Tensor  # [T, N] float64
    canary: torch.Tensor  # [T] float64
    member: int

    def world(self, poisoned: bool) -> torch.Tensor:
        """a [T, N] in D (``poisoned`` False) or D'."""
        if not poisoned:
            return self.kept
        a = self.kept.clone()
        a[:, self.member] = self.canary
        return a


def candidate_tokens(public: torch.Tensor, count: int = 16) -> torch.Tensor:
    """Tokens at log-spaced ranks of public [V] (rank 0, the mode, to the rarest): [<= count]."""
    order = torch.argsort(public.double(), descending=True)  # [V]
    V = public.shape[0]
    ranks = sorted({min(V - 1, int(round(math.exp(x * math.log(V) / max(count - 1, 1)))) - 1)
                    for x in range(count)})
    return order[torch.tensor(ranks, dtype=torch.long)]


def choose_canary(public: torch.Tensor, params: MechanismParams, count: int = 16) -> tuple[int, float, float]:
    """(y*, a', e): the candidate token whose point-mass member moves the release most per unit
    noise, that member's single release probability of it, and the empty draw's (p_0's after the
    release's renormalisation). Reads the public row only."""
    p0 = release(public, public.new_zeros((0, public.shape[0])), params)  # [V] the empty draw: p_0
    c = member_weight(params.ensemble_size, params.sample_rate)
    best = None
    for y in candidate_tokens(public, count).tolist():
        row = torch.zeros_like(public)
        row[y] = 1.0
        a = float(release(public, row[None], params)[y])
        base = float(p0[y])
        if base <= 0.0:
            continue
        score = (c * (a - base)) ** 2 / base
        if best is None or score > best[0]:
            best = (score, y, a, base)
    if best is None:
        raise ConfigError("audit", "the public distribution has no candidate token of positive probability")
    return best[1], best[2], best[3]


def position_rates(public: torch.Tensor, members: torch.Tensor, params: MechanismParams, member: int = 0,
                   checks: int = 4, generator: torch.Generator | None = None) -> PositionRates:
    """public [T, V] and members [T, N, V] (each row a distribution, as the runtime gives them)
    -> PositionRates, with ``checks`` random multi-member draws per position (including the
    canary in D') checked against ``release`` of the whole draw (AuditMismatch)."""
    T, N, V = members.shape
    if public.shape != (T, V):
        raise ValueError(f"public must be [T, V] = [{T}, {V}], got {tuple(public.shape)}")
    if not 0 <= member < N:
        raise ConfigError("member", f"must lie in [0, {N}), got {member}")
    if params.ensemble_size != N:
        raise ConfigError("members", f"the mechanism is for N = {params.ensemble_size}, the rows hold {N}")
    tokens = torch.empty(T, dtype=torch.long)
    empty = torch.empty(T, dtype=torch.float64)
    kept = torch.empty(T, N, dtype=torch.float64)
    canary = torch.empty(T, dtype=torch.float64)
    for t in range(T):
        p0, rows = public[t], members[t]
        y, a_canary, empty[t] = choose_canary(p0, params)
        tokens[t], canary[t] = y, a_canary
        for j in range(N):
            kept[t, j] = release(p0, rows[j : j + 1], params)[y]
        poisoned = rows.clone()
        poisoned[member] = 0.0
        poisoned[member, y] = 1.0
        a_poisoned = kept[t].clone()
        a_poisoned[member] = a_canary
        for k in range(checks):
            drawn = torch.randperm(N, generator=generator)[: max(2, N // 2)] if N > 1 else torch.zeros(1, dtype=torch.long)
            if k % 2 == 0 and member not in drawn.tolist():
                drawn[0] = member
            mask = torch.zeros(N, dtype=torch.bool)
            mask[drawn] = True
            for rows_w, a_w in ((rows, kept[t]), (poisoned, a_poisoned)):
                mean = float(a_w[drawn].mean())
                # the release of the whole draw, as generation (release) and constant-work serving
                # (release_masked over all N rows) compute it
                for how, whole in (("release", float(release(p0, rows_w[drawn], params)[y])),
                                   ("release_masked", float(release_masked(p0, rows_w, mask, params)[y]))):
                    if abs(whole - mean) > MATCH_TOL * max(1.0, abs(whole)):
                        raise AuditMismatch(f"position {t}: {how} of {len(drawn)} members gives {whole!r} for the "
                                            f"canary token, the mean of their single releases {mean!r}")
    return PositionRates(tokens, empty, kept, canary, member)


def session_bits(a: torch.Tensor, empty: torch.Tensor, sample_rate: float, sessions: int,
                 generator: torch.Generator | None = None, chunk: int = 256) -> torch.Tensor:
    """Simulate ``sessions`` sessions of the T queries: for each, a Poisson(q) draw per query,
    the release's probability of the canary token (the mean of a [T, N] over the draw, ``empty``
    [T] for an empty draw), and whether the sampled token was it. -> bool [sessions, T]."""
    T, N = a.shape
    out = []
    for start in range(0, sessions, chunk):
        r = min(chunk, sessions - start)
        mask = torch.rand(r, T, N, generator=generator, dtype=torch.float64) < sample_rate  # [r, T, N]
        k = mask.sum(-1)  # [r, T]
        s = (mask.double() * a).sum(-1)  # [r, T]
        p = torch.where(k > 0, s / k.clamp(min=1), empty.expand(r, T))  # [r, T]
        out.append(torch.rand(r, T, generator=generator, dtype=torch.float64) < p)
    return torch.cat(out)


def marginal(a: torch.Tensor, empty: torch.Tensor, ensemble_size: int, sample_rate: float) -> torch.Tensor:
    """The released probability of the canary token, the draw summed out (Lemma 1, eq. (R1)):
    (1 - q)^N p_0 + c sum_j a_j. [T]."""
    c = member_weight(ensemble_size, sample_rate)
    return (1.0 - sample_rate) ** ensemble_size * empty + c * a.sum(-1)


def llr_statistic(bits: torch.Tensor, p: torch.Tensor, p_alt: torch.Tensor) -> torch.Tensor:
    """The log-likelihood ratio of D' against D for each session's bits [S, T] (T independent
    Bernoulli bits of marginal rates p [T] under D and p_alt under D'; the Neyman-Pearson test on
    them). -> [S] float64."""
    eps = 1e-300
    on = torch.log(p_alt.clamp(min=eps)) - torch.log(p.clamp(min=eps))  # [T]
    off = torch.log1p(-p_alt.clamp(max=1 - 1e-16)) - torch.log1p(-p.clamp(max=1 - 1e-16))  # [T]
    return bits.double() @ on + (~bits).double() @ off


def _best_threshold(null: torch.Tensor, alt: torch.Tensor, delta: float) -> float:
    """The threshold tau (reject D when the statistic >= tau) with the largest point estimate of
    log((TPR - delta) / FPR) on these (selection) sessions, FPR floored at 1/(2 n0)."""
    best = (-math.inf, math.inf)
    n0, n1 = null.numel(), alt.numel()
    for tau in torch.unique(torch.cat([null, alt])).tolist():
        tpr = float((alt >= tau).sum()) / n1
        fpr = max(float((null >= tau).sum()), 0.5) / n0
        if tpr > delta:
            v = math.log((tpr - delta) / fpr)
            if v > best[0]:
                best = (v, tau)
    return best[1]


@dataclass(frozen=True)
class AuditResult:
    queries: int  # T per session
    sessions: int  # per world
    member: int
    epsilon_lower: float  # eq. (A3), the larger of the two directions
    direction: str  # "D' vs D" (canary detected) or "D vs D'"
    confidence: float  # of epsilon_lower (every Clopper-Pearson bound at 1 - beta / 4)
    epsilon_claimed: float  # the accountant's epsilon for `queries` queries at delta
    delta: float
    counts: dict  # per direction: tp, n1, fp, n0 on the evaluation half, and the threshold
    mean_lift: float  # mean over positions of p'(y*) / p(y*) (marginal rates: a non-private diagnostic)
    ceiling: float  # the largest bound these session counts can give (every hit, no false alarm)

    @property
    def violated(self) -> bool:
        """True when the lower bound exceeds the claim: the claimed guarantee is false (at the
        stated confidence)."""
        return self.epsilon_lower > self.epsilon_claimed

    def record(self) -> dict[str, Any]:
        return {"queries": self.queries, "sessions_per_world": self.sessions, "member": self.member,
                "epsilon_lower_bound": self.epsilon_lower, "direction": self.direction,
                "confidence": self.confidence, "epsilon_claimed": self.epsilon_claimed, "delta": self.delta,
                "violated": self.violated, "counts": self.counts, "nonprivate_mean_lift": self.mean_lift,
                "ceiling": self.ceiling}


def audit(rates: PositionRates, params: MechanismParams, *, delta: float, epsilon_claimed: float,
          sessions: int = 20000, confidence: float = 0.95, generator: torch.Generator | None = None) -> AuditResult:
    """Run the game (module docstring) on ``rates`` with ``sessions`` sessions per world: the first
    half of each world's sessions chooses each direction's threshold, the second half is counted
    and gives eq. (A3); the result is the larger direction's bound, at ``confidence`` overall (four
    Clopper-Pearson bounds, each at 1 - (1 - confidence) / 4)."""
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 4:
        raise ConfigError("sessions", f"must be an integer >= 4, got {sessions!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ConfigError("confidence", f"must lie in (0, 1), got {confidence!r}")
    N, q = params.ensemble_size, params.sample_rate
    a0, a1 = rates.world(False), rates.world(True)
    p, p_alt = marginal(a0, rates.empty, N, q), marginal(a1, rates.empty, N, q)
    stat0 = llr_statistic(session_bits(a0, rates.empty, q, sessions, generator), p, p_alt)  # [S] under D
    stat1 = llr_statistic(session_bits(a1, rates.empty, q, sessions, generator), p, p_alt)  # [S] under D'
    h = sessions // 2
    beta = (1.0 - confidence) / 4.0
    counts, bounds = {}, {}
    for name, null, alt in (("D' vs D", stat0, stat1), ("D vs D'", -stat1, -stat0)):
        tau = _best_threshold(null[:h], alt[:h], delta)
        ev_null, ev_alt = null[h:], alt[h:]
        tp, fp = int((ev_alt >= tau).sum()), int((ev_null >= tau).sum())
        n1, n0 = ev_alt.numel(), ev_null.numel()
        counts[name] = {"threshold": tau, "tp": tp, "n1": n1, "fp": fp, "n0": n0}
        bounds[name] = epsilon_lower_bound(tp, n1, fp, n0, delta, beta) if math.isfinite(tau) else 0.0
    direction = max(bounds, key=bounds.get)
    lift = float((p_alt / p.clamp(min=1e-300)).mean())
    n = sessions - h
    ceiling = epsilon_lower_bound(n, n, 0, n, delta, beta)
    return AuditResult(rates.kept.shape[0], sessions, rates.member, bounds[direction], direction, confidence,
                       float(epsilon_claimed), float(delta), counts, lift, ceiling)


def unsound_control(params: MechanismParams) -> MechanismParams:
    """The same mechanism without its ball (every radius infinite, lam_max 1: each drawn member
    released as it is) but audited against the sound claim: the control that shows what the
    audit can catch on the same positions (it is not private at any epsilon)."""
    return dataclasses.replace(params, radii=tuple(math.inf for _ in params.radii), lam_max=1.0)


@torch.no_grad()
def ensemble_positions(runtime: Any, positions: int, block_size: int, start_token: int,
                       chunk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions`` public query positions: contexts sampled from the public model alone
    (``eval.tuning.public_blocks``, a fixed seed: no private data chooses them), every prefix of
    each block one position. -> (public [T, V], members [T, N, V]) float32 on the CPU, the
    runtime's own next-token distributions."""
    from pmixed.eval.tuning import public_blocks
    from pmixed.models.runtime import PUBLIC

    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ConfigError("queries", f"must be an integer >= 1, got {positions!r}")
    L = max(2, block_size)
    blocks = public_blocks(runtime, math.ceil(positions / L), L, start_token)  # [n, L]
    N = runtime.n_members
    pub, mem = [], []
    for block in blocks:
        x = block[None]  # [1, L]
        pub.append(runtime.probs(x, [PUBLIC])[0].cpu())  # [L, V]
        rows = [runtime.probs(x.expand(len(ids), -1), ids).cpu()  # [b, L, V]
                for ids in (list(range(s, min(N, s + chunk))) for s in range(0, N, chunk))]
        mem.append(torch.cat(rows).transpose(0, 1))  # [L, N, V]
    return torch.cat(pub)[:positions], torch.cat(mem)[:positions]
