"""Teacher-forced scoring of many PMixED runs from one pass over the members (eq. (M1), (P1)).

In teacher-forced evaluation every position t of a block is one query whose answer is scored
only at the true next token y_t:

    M_t(y_t) = (1/|S_t|) sum_{i in S_t} [lam_{i,t} p_i(y_t | x_t) + (1 - lam_{i,t}) p_0(y_t | x_t)]

(p_0(y_t | x_t) when S_t is empty). lam_{i,t} depends on the member only through its moments
a_k(p_i; p_0) (eq. (P1)). So one pass over the members can keep, per (position, member), just
the K-1 moments and the target probability; afterwards any number of runs (fresh draws) and any
mechanism parameters with max_order <= K are scored from these small tensors, exactly as
``release`` would score them (tests/mechanism/test_teacher_forcing.py checks equality).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmixed.mechanism.pairs import member_totals, pair_moments, row_totals
from pmixed.mechanism.projection import lambdas_from_moments
from pmixed.privacy.params import MechanismParams


@dataclass
class BlockStats:
    """What the mechanism needs from one block, for every member.

    moments:        [T, N, K-1] float64   a_2..a_K of member i at position t (nan: not computed)
    member_target:  [T, N]      float64   p_i(y_t | x_t), renormalised
    public_target:  [T]         float64   p_0(y_t | x_t), renormalised
    public_entropy: [T]         float64   H(p_0(. | x_t)) in nats (the screen's public score), or None
    """

    moments: torch.Tensor
    member_target: torch.Tensor
    public_target: torch.Tensor
    public_entropy: torch.Tensor | None = None

    @property
    def max_order(self) -> int:
        return self.moments.shape[-1] + 1


def member_stats(
    public: torch.Tensor, members: torch.Tensor, targets: torch.Tensor, max_order: int,
    needed: torch.Tensor | None = None, public_total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments and target probabilities of a chunk of members over one block.

    public [T, V]: the public probabilities in any float dtype (never copied whole to float64);
    public_total [T, 1] or [T] float64 its validated row sums (computed here when None).
    members [c, T, V] (any float), targets [T] long, needed [T, c] bool (pairs whose moments are
    wanted; default all).
    Returns moments [T, c, K-1] (nan where not needed) and member_target [T, c]: every pair's
    renormalised target probability p_i(y_t) = x_i(y_t) / T_i (the non-private ensemble average
    uses them all), from the same validated float64 totals the mechanism uses. An invalid member
    row has inf moments (lam = 0) and the public target probability (pairs.py).
    """
    c, T, V = members.shape
    ptot = row_totals(public, "public") if public_total is None else public_total.reshape(-1)
    flat = members.reshape(c * T, V)  # row j*T + t = member j at position t
    tot, valid = member_totals(flat)  # [c*T]; invalid rows flagged, never an error (pairs.py)
    t_idx = targets.repeat(c)  # [c*T]
    dev = public.device  # everything below stays on the members' device
    p0t = public.gather(1, targets[:, None]).squeeze(1).to(torch.float64) / ptot.to(dev)  # [T]
    mt = flat.gather(1, t_idx[:, None]).squeeze(1).to(torch.float64) / tot.to(dev)  # [c*T]
    mt = torch.where(valid.to(dev), mt, p0t.repeat(c))  # an invalid member row answers with p_0
    member_target = mt.reshape(c, T).T
    needed = torch.ones(T, c, dtype=torch.bool, device=dev) if needed is None else needed.to(dev)
    pos, mem = needed.nonzero(as_tuple=True)  # sorted by position
    moments = torch.full((T, c, max_order - 1), float("nan"), dtype=torch.float64, device=dev)
    mom, _, _ = pair_moments(public, ptot, flat, pos, mem * T + pos, max_order, member_total=tot,
                             member_valid=valid)
    moments[pos, mem] = mom
    return moments, member_target.contiguous()


def released_target_probs(
    stats: BlockStats, mask: torch.Tensor, params: MechanismParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released probability of each target for one run's draws.

    mask [T, N'] bool (member i drawn at position t; N' <= N uses the first N' members).
    Returns (probs [T] float64, lam [T, N'] float64 with nan where not drawn).
    """
    T, n = mask.shape
    K = params.max_order
    if K > stats.max_order:
        raise ValueError(f"params need moments up to order {K}, stats hold up to {stats.max_order}")
    pos, mem = mask.nonzero(as_tuple=True)  # [R]
    mom = stats.moments[pos, mem, : K - 1]  # [R, K-1]
    if torch.isnan(mom).any():
        raise ValueError("moments were not computed for some drawn (position, member) pairs")
    lam = lambdas_from_moments(mom, params)  # [R]
    pt = stats.member_target[pos, mem]
    p0t = stats.public_target[pos]
    picked = lam * pt + (1.0 - lam) * p0t  # [R]
    acc = torch.zeros(T, dtype=torch.float64).index_add_(0, pos, picked)
    cnt = torch.zeros(T, dtype=torch.float64).index_add_(0, pos, torch.ones_like(picked))
    probs = torch.where(cnt > 0, acc / cnt.clamp(min=1), stats.public_target)
    lam_full = torch.full((T, n), float("nan"), dtype=torch.float64)
    lam_full[pos, mem] = lam
    return probs, lam_full


def binding_order(stats: BlockStats, mask: torch.Tensor, params: MechanismParams) -> torch.Tensor:
    """Which constraint set lam for each drawn pair: 1 = lam_max (B1), k >= 2 = order k (B2)."""
    pos, mem = mask.nonzero(as_tuple=True)
    K = params.max_order
    mom = stats.moments[pos, mem, : K - 1]
    taus = torch.tensor(params.radii, dtype=torch.float64)
    ks = torch.arange(2, K + 1, dtype=torch.float64)
    bounds = torch.exp((torch.log(taus) - torch.log(mom)) / ks)  # [R, K-1]
    best, arg = bounds.min(dim=-1)
    return torch.where(best >= params.lam_max, torch.ones_like(arg), arg + 2)
