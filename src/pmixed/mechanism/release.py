"""The released distribution of one query, or of a block of teacher-forced queries (eq. (M1)).

    M = p_0                                   if no member is drawn,
    M = (1/|S|) sum_{i in S} pbar_i           otherwise,

where S is the realised Poisson draw and pbar_i the projection (projection.py). Everything is
float64 and deterministic given the inputs.
"""

from __future__ import annotations

import torch

from pmixed.mechanism.divergence import as_distribution
from pmixed.mechanism.projection import mixing_weights, project
from pmixed.privacy.params import MechanismParams

ROW_CHUNK = 64  # member rows handled at once: bounds temporary memory to ~ROW_CHUNK * V * 8 B * 4


def release(public: torch.Tensor, members: torch.Tensor, params: MechanismParams) -> torch.Tensor:
    """public [V], members [m, V] (the drawn members; m may be 0) -> [V] float64."""
    p0 = as_distribution(public, "public")
    if p0.dim() != 1:
        raise ValueError(f"public must be [V], got shape {tuple(public.shape)}")
    if members.dim() != 2 or members.shape[-1] != p0.shape[-1]:
        raise ValueError(f"members must be [m, V] with V={p0.shape[-1]}, got {tuple(members.shape)}")
    if members.shape[0] == 0:
        return p0
    pm = as_distribution(members, "members")  # [m, V]
    lam = mixing_weights(p0.unsqueeze(0), pm, params)  # [m]
    return project(p0.unsqueeze(0), pm, lam).mean(dim=0)


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
    p0 = as_distribution(public, "public")  # [P, V]
    R = member_rows.shape[0]
    counts = torch.bincount(row_position, minlength=P).to(torch.float64)  # [P]
    lam = torch.empty(R, dtype=torch.float64)
    if targets is None:
        acc = torch.zeros(P, V, dtype=torch.float64)
    else:
        acc = torch.zeros(P, dtype=torch.float64)
    for s in range(0, R, ROW_CHUNK):
        rows = slice(s, min(R, s + ROW_CHUNK))
        pos = row_position[rows]  # [r]
        pm = as_distribution(member_rows[rows], "members")  # [r, V]
        base = p0[pos]  # [r, V]
        lam_c = mixing_weights(base, pm, params)  # [r]
        lam[rows] = lam_c
        if targets is None:
            acc.index_add_(0, pos, project(base, pm, lam_c))
        else:
            t = targets[pos]
            picked = lam_c * pm.gather(1, t[:, None]).squeeze(1) + (1 - lam_c) * base.gather(1, t[:, None]).squeeze(1)
            acc.index_add_(0, pos, picked)
    drawn = counts > 0
    if targets is None:
        out = torch.where(drawn[:, None], acc / counts.clamp(min=1)[:, None], p0)
    else:
        out = torch.where(drawn, acc / counts.clamp(min=1), p0.gather(1, targets[:, None]).squeeze(1))
    return out, lam
