"""Validated row totals and the moments a_k of (position, member) pairs (docs/privacy.md eq. (B2)).

One entry point for release, release_rows and teacher forcing: the fused CPU kernels
(``fused.py``) when they apply, the torch reference (``divergence.py``) otherwise. Both validate
the rows they use (finite, non-negative, positive mass) and return float64.
"""

from __future__ import annotations

import numpy as np
import torch

from pmixed.mechanism import fused
from pmixed.mechanism.divergence import abs_moments, check_distribution_rows

FUSED_DTYPES = (torch.float32, torch.float64)
ROW_CHUNK = 4  # torch reference: member rows at once ([4, V] float64 temporaries stay in cache)
GPU_ROW_CHUNK = 256  # on an accelerator: fewer, larger kernels ([256, V] float64 temporaries)


def use_fused(*tensors: torch.Tensor) -> bool:
    """The fused kernels take CPU float32/float64 tensors."""
    return fused.enabled() and all(t.device.type == "cpu" and t.dtype in FUSED_DTYPES for t in tensors)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def check_index(idx: torch.Tensor, size: int, name: str) -> None:
    """The compiled kernels do not bounds-check: every index must lie in [0, size)."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise IndexError(f"{name} holds an index outside [0, {size})")


def raise_status(status: np.ndarray, name: str) -> None:
    if (status == fused.BAD_VALUES).any():
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    if (status == fused.ZERO_MASS).any():
        raise ValueError(f"{name} has a row with zero total mass")


def row_totals(p: torch.Tensor, name: str, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Validated float64 row sums of p [M, V] (rows ``idx`` [n], default all) -> [n]."""
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of probabilities, got {p.dtype}")
    if p.dim() != 2:
        raise ValueError(f"{name} must be [rows, V], got shape {tuple(p.shape)}")
    if not use_fused(p):
        rows = p if idx is None else p[idx]
        return check_distribution_rows(rows, name).reshape(-1)
    if idx is not None:
        check_index(idx, p.shape[0], "row index")
    ix = np.arange(p.shape[0], dtype=np.int64) if idx is None else _np(idx.to(torch.int64))
    tot = np.empty(ix.shape[0], dtype=np.float64)
    status = np.empty(ix.shape[0], dtype=np.int64)
    fused.rows_check(_np(p), ix, tot, status)
    raise_status(status, name)
    return torch.from_numpy(tot)


def pair_moments(
    public: torch.Tensor,
    public_total: torch.Tensor,
    members: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    max_order: int,
    member_total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """a_2..a_K of member row ``rows[r]`` against public row ``pos[r]``, both renormalised.

    public [P, V] (any float), public_total [P] float64 (from ``row_totals``), members [M, V],
    pos [R] long (any order), rows [R] long, member_total [M] float64 (optional: the members' row totals; the
    used rows are validated here otherwise).
    Returns (moments [R, K-1] float64, inf where no finite ball holds the member; totals [R]).
    """
    if max_order < 2:
        raise ValueError("max_order must be >= 2")
    R = pos.shape[0]
    if members.dim() != 2 or members.shape[-1] != public.shape[-1]:
        raise ValueError(f"members must be [rows, V] with V={public.shape[-1]}, got {tuple(members.shape)}")
    mt = row_totals(members, "members", rows) if member_total is None else member_total[rows]
    if R == 0:
        return torch.empty(0, max_order - 1, dtype=torch.float64), mt
    ptot = public_total.reshape(-1).to(torch.float64)
    check_index(pos, public.shape[0], "position index")  # both paths: no negative wrap-around
    check_index(rows, members.shape[0], "member row index")
    if use_fused(public, members):
        out = np.empty((R, max_order - 1), dtype=np.float64)
        fused.pair_moments(_np(public), _np(ptot), _np(members), _np(pos.to(torch.int64)),
                           _np(rows.to(torch.int64)), _np(mt), out)
        return torch.from_numpy(out), mt
    moments = torch.empty(R, max_order - 1, dtype=torch.float64, device=public.device)
    step = ROW_CHUNK if public.device.type == "cpu" else GPU_ROW_CHUNK
    for s in range(0, R, step):
        c = slice(s, min(R, s + step))
        base = public[pos[c]].to(torch.float64).div_(ptot[pos[c], None])  # [r, V]
        pm = members[rows[c]].to(torch.float64).div_(mt[c, None])  # [r, V]
        moments[c] = abs_moments(base, pm, max_order)
    return moments, mt


def mix(public: torch.Tensor, public_total: torch.Tensor, members: torch.Tensor, member_total: torch.Tensor,
        lam: torch.Tensor) -> torch.Tensor:
    """The released distribution (eq. (M1)) of one query with m >= 1 drawn members:

        M = (1/m) sum_i [lam_i p_i + (1 - lam_i) p_0] = sum_i (lam_i / m) x_i / T_i + (1 - mean lam) y / T_0

    public [V], public_total [] float64, members [m, V], member_total [m], lam [m] -> [V] float64.
    """
    m = members.shape[0]
    coef = lam / (m * member_total)  # [m]
    c0 = (1.0 - lam.mean()) / public_total.reshape(())
    if use_fused(public, members):
        out = np.empty(public.shape[-1], dtype=np.float64)
        fused.mix_row(_np(public), float(c0), _np(members), _np(coef), out)
        return torch.from_numpy(out)
    return torch.addcmul(coef @ members.to(torch.float64), public.to(torch.float64), c0)
