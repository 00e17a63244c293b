"""The released distribution of one query, or of a block of teacher-forced queries (eq. (M1)).

    M = p_0                                   if no member is drawn,
    M = (1/|S|) sum_{i in S} pbar_i           otherwise,

where S is the realised Poisson draw and pbar_i the projection (projection.py). Everything is
float64 and deterministic given the inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from pmixed.mechanism import fused
from pmixed.mechanism.divergence import as_distribution
from pmixed.mechanism.pairs import (
    ROW_CHUNK,
    mix,
    pair_moments,
    raise_status,
    row_totals,
    use_fused,
)
from pmixed.mechanism.projection import MARGIN, lambdas_from_moments, project
from pmixed.privacy.params import MechanismParams


def release(public: torch.Tensor, members: torch.Tensor, params: MechanismParams) -> torch.Tensor:
    """public [V], members [m, V] (the drawn members; m may be 0) -> [V] float64.

    An invalid public row raises ValueError (public data only); an invalid member row gets
    lam = 0 and never raises (pairs.py).
    """
    if not torch.is_tensor(public) or public.dim() != 1:
        raise ValueError(f"public must be a [V] tensor, got {getattr(public, 'shape', type(public))}")
    if members.dim() != 2 or members.shape[-1] != public.shape[-1]:
        raise ValueError(f"members must be [m, V] with V={public.shape[-1]}, got {tuple(members.shape)}")
    if not members.is_floating_point() and members.shape[0]:
        raise TypeError(f"members must be a floating-point tensor of probabilities, got {members.dtype}")
    if use_fused(public, members):  # one compiled call: validation, moments, lam, mix
        return _release_fused(public, members, params)
    if members.shape[0] == 0:
        return as_distribution(public, "public")
    pub = public[None]  # [1, V]
    tot0 = row_totals(pub, "public")  # [1]
    m = members.shape[0]
    rows = torch.arange(m, device=members.device)
    moments, tot, valid = pair_moments(pub, tot0, members, torch.zeros_like(rows), rows, params.max_order)
    lam = lambdas_from_moments(moments, params)  # [m]; 0 for invalid member rows (moments inf)
    return mix(public, tot0, members, tot, lam, valid)


def _release_fused(public: torch.Tensor, members: torch.Tensor, params: MechanismParams) -> torch.Tensor:
    m, V = members.shape
    out = np.empty(V, dtype=np.float64)
    mstatus = np.zeros(m, dtype=np.int64)
    lam = np.empty(m, dtype=np.float64)
    log_taus = np.log(np.asarray(params.radii, dtype=np.float64))
    pstatus = fused.release_one(public.detach().contiguous().numpy(), members.detach().contiguous().numpy(),
                                log_taus, params.lam_max * (1.0 - MARGIN), MARGIN, out, mstatus, lam)
    raise_status(np.asarray([pstatus]), "public")  # public data only: may refuse
    # invalid member rows (mstatus != 0) got lam = 0 inside the kernel: never an error
    return torch.from_numpy(out)


def release_rows(
    public: torch.Tensor,
    member_rows: torch.Tensor,
    row_position: torch.Tensor,
    params: MechanismParams,
    *,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of queries given as flat (member, position) rows.

    public:       [P, V]  the public distribution at each position
    member_rows:  [R, V]  one drawn member's distribution per row
    row_position: [R]     the position each row belongs to
    targets:      [P]     optional: if given, only the released probability of each target is
                          returned (teacher forcing), never the [P, V] matrix.
    Returns (released, lam): released [P, V] float64 (or [P] with targets), lam [R] float64.
    """
    P, V = public.shape
    dev = public.device
    R = member_rows.shape[0]
    if member_rows.dim() != 2 or member_rows.shape[-1] != V or row_position.shape != (R,):
        raise ValueError(f"member_rows must be [R, {V}] and row_position [R], got "
                         f"{tuple(member_rows.shape)} and {tuple(row_position.shape)}")
    tot0 = row_totals(public, "public")  # [P] float64; no float64 copy of public
    rows = torch.arange(R, device=member_rows.device)
    moments, tot, valid = pair_moments(public, tot0, member_rows, row_position, rows, params.max_order)
    lam = lambdas_from_moments(moments, params)  # [R]; 0 for invalid member rows
    ok = valid.to(dev)
    counts = torch.bincount(row_position, minlength=P).to(torch.float64)  # [P]
    drawn = counts > 0
    if targets is not None:
        p0_t = public.gather(1, targets[:, None]).squeeze(1).to(torch.float64) / tot0  # [P]
        t = targets[row_position]  # [R]
        pt = member_rows.gather(1, t[:, None]).squeeze(1).to(torch.float64) / tot  # [R]
        pt = torch.where(ok, pt, p0_t[row_position])  # an invalid member row answers with p_0
        picked = lam * pt + (1 - lam) * p0_t[row_position]  # [R]
        acc = torch.zeros(P, dtype=torch.float64, device=dev).index_add_(0, row_position, picked)
        return torch.where(drawn, acc / counts.clamp(min=1), p0_t), lam
    acc = torch.zeros(P, V, dtype=torch.float64, device=dev)
    for s in range(0, R, ROW_CHUNK):
        c = slice(s, min(R, s + ROW_CHUNK))
        pos = row_position[c]  # [r]
        pm = member_rows[c].to(torch.float64).div_(tot[c, None])  # [r, V]
        base = public[pos].to(torch.float64).div_(tot0[pos, None])  # [r, V]
        pm = torch.where(ok[c, None], pm, base)  # an invalid member row answers with p_0
        acc.index_add_(0, pos, project(base, pm, lam[c]))
    p0 = public.to(torch.float64).div_(tot0[:, None])
    return torch.where(drawn[:, None], acc / counts.clamp(min=1)[:, None], p0), lam


def release_masked(public: torch.Tensor, members: torch.Tensor, drawn: torch.Tensor, params: MechanismParams) -> torch.Tensor:
    """eq. (M1) with the work of every member: public [V], members [N, V] (every member's
    distribution), drawn [N] bool (the Poisson draw) -> [V] float64, equal (to float64 rounding)
    to ``release(public, members[drawn])``.

    The constant-work path of serving: moments and lam are computed for all N rows and the mix is
    one [N] x [N, V] product with zero weights for the members not drawn, so the time taken does
    not depend on the draw. An invalid member row gets lam 0, as in ``release``.
    """
    if members.dim() != 2 or members.shape[-1] != public.shape[-1] or drawn.shape != (members.shape[0],):
        raise ValueError(f"members must be [N, V] with V={public.shape[-1]} and drawn [N], got "
                         f"{tuple(members.shape)} and {tuple(drawn.shape)}")
    pub = public[None]  # [1, V]
    tot0 = row_totals(pub, "public")  # [1]; public data only: may refuse
    N = members.shape[0]
    rows = torch.arange(N, device=members.device)
    moments, tot, valid = pair_moments(pub, tot0, members, torch.zeros_like(rows), rows, params.max_order)
    lam = lambdas_from_moments(moments, params)  # [N]
    w = drawn.to(torch.float64)  # [N]
    m = w.sum().clamp(min=1.0)
    lam = torch.where(valid, lam, torch.zeros_like(lam)) * w  # undrawn and invalid rows: weight 0
    x = torch.where(valid[:, None], members, torch.zeros((), dtype=members.dtype)).to(torch.float64)  # [N, V]
    coef = lam / (m * tot)  # [N]
    c0 = (1.0 - lam.sum() / m) / tot0.reshape(())
    return torch.addcmul(coef @ x, public.to(torch.float64), c0)
