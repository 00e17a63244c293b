"""Validated row totals and the moments a_k of (position, member) pairs (docs/privacy.md eq. (B2)).

One entry point for release, release_rows and teacher forcing: the fused CPU kernels
(``fused.py``) when they apply, the torch reference (``divergence.py``) otherwise. Both validate
the rows they use (finite, non-negative, positive mass) and return float64.

Invalid rows are treated by who they belong to. The public row p_0 is a function of public data
only: an invalid one is refused (``row_totals`` raises) before anything is drawn. A member row
is private: whether it is valid depends on the member drawn, so an error there would be an
uncharged, data-dependent signal. An invalid member row is therefore never an error: it is
flagged (``member_totals``), its moments are inf, so lam = 0 (eq. (P1)) and the public model
answers for it (pbar_i = p_0), and the query is charged like any other.
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


def _check_rows(p: torch.Tensor, name: str) -> None:
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of probabilities, got {p.dtype}")
    if p.dim() != 2:
        raise ValueError(f"{name} must be [rows, V], got shape {tuple(p.shape)}")


def _fused_status(p: torch.Tensor, idx: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """The fused check pass over rows ``idx`` of p: (float64 totals [n], status [n])."""
    if idx is not None:
        check_index(idx, p.shape[0], "row index")
    ix = np.arange(p.shape[0], dtype=np.int64) if idx is None else _np(idx.to(torch.int64))
    tot = np.empty(ix.shape[0], dtype=np.float64)
    status = np.empty(ix.shape[0], dtype=np.int64)
    fused.rows_check(_np(p), ix, tot, status)
    return tot, status


def row_totals(p: torch.Tensor, name: str, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Validated float64 row sums of p [M, V] (rows ``idx`` [n], default all) -> [n]; raises
    ValueError on an invalid row (for the public row: module docstring)."""
    _check_rows(p, name)
    if not use_fused(p):
        rows = p if idx is None else p[idx]
        return check_distribution_rows(rows, name).reshape(-1)
    tot, status = _fused_status(p, idx)
    raise_status(status, name)
    return torch.from_numpy(tot)


def member_totals(members: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 row sums of member rows ``idx`` [n] (default all) of members [M, V] -> (totals [n],
    valid [n] bool). Never raises on the values: an invalid row (non-finite, negative, zero mass)
    is flagged, and its total is set to 1 so that no division by it makes inf or nan."""
    _check_rows(members, "members")
    if use_fused(members):
        tot, status = _fused_status(members, idx)
        valid, tot_t = torch.from_numpy(status == 0), torch.from_numpy(tot)
    else:
        rows = members if idx is None else members[idx]
        tot_t = rows.sum(dim=-1, dtype=torch.float64)  # [n]
        valid = torch.isfinite(tot_t) & (tot_t > 0)
        if rows.numel():
            valid &= rows.amin(dim=-1) >= 0  # amin propagates nan
    return torch.where(valid, tot_t, torch.ones_like(tot_t)), valid


def pair_moments(
    public: torch.Tensor,
    public_total: torch.Tensor,
    members: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    max_order: int,
    member_total: torch.Tensor | None = None,
    member_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a_2..a_K of member row ``rows[r]`` against public row ``pos[r]``, both renormalised.

    public [P, V] (any float), public_total [P] float64 (from ``row_totals``), members [M, V],
    pos [R] long (any order), rows [R] long, member_total [M] float64 and member_valid [M] bool (optional,
    together: ``member_totals`` of all members; the used rows are checked here otherwise).
    Returns (moments [R, K-1] float64, inf where no finite ball holds the member or the member
    row is invalid; totals [R] (1 for invalid rows); valid [R] bool, the member row is a valid
    distribution). Invalid member rows never raise (module docstring).
    """
    if max_order < 2:
        raise ValueError("max_order must be >= 2")
    R = pos.shape[0]
    if members.dim() != 2 or members.shape[-1] != public.shape[-1]:
        raise ValueError(f"members must be [rows, V] with V={public.shape[-1]}, got {tuple(members.shape)}")
    if member_total is None:
        mt, valid = member_totals(members, rows)
    else:
        mt, valid = member_total[rows], member_valid[rows]
    if R == 0:
        return torch.empty(0, max_order - 1, dtype=torch.float64), mt, valid
    ptot = public_total.reshape(-1).to(torch.float64)
    check_index(pos, public.shape[0], "position index")  # both paths: no negative wrap-around
    check_index(rows, members.shape[0], "member row index")
    if use_fused(public, members):
        out = np.empty((R, max_order - 1), dtype=np.float64)
        fused.pair_moments(_np(public), _np(ptot), _np(members), _np(pos.to(torch.int64)),
                           _np(rows.to(torch.int64)), _np(mt), out)
        moments = torch.from_numpy(out)
        moments[~valid] = torch.inf  # lam = 0: the public model answers for an invalid member row
        return moments, mt, valid
    moments = torch.empty(R, max_order - 1, dtype=torch.float64, device=public.device)
    step = ROW_CHUNK if public.device.type == "cpu" else GPU_ROW_CHUNK
    for s in range(0, R, step):
        c = slice(s, min(R, s + step))
        base = public[pos[c]].to(torch.float64).div_(ptot[pos[c], None])  # [r, V]
        pm = members[rows[c]].to(torch.float64).div_(mt[c, None])  # [r, V]
        moments[c] = abs_moments(base, pm, max_order)
    moments[~valid.to(moments.device)] = torch.inf  # lam = 0 (module docstring)
    return moments, mt, valid


def mix(public: torch.Tensor, public_total: torch.Tensor, members: torch.Tensor, member_total: torch.Tensor,
        lam: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The released distribution (eq. (M1)) of one query with m >= 1 drawn members:

        M = (1/m) sum_i [lam_i p_i + (1 - lam_i) p_0] = sum_i (lam_i / m) x_i / T_i + (1 - mean lam) y / T_0

    public [V], public_total [] float64, members [m, V], member_total [m], lam [m], valid [m] bool
    (optional: invalid member rows, which have lam 0, are left out of the sum; they count in m)
    -> [V] float64.
    """
    m = members.shape[0]
    if valid is not None and not bool(valid.all()):
        members = torch.where(valid.to(members.device)[:, None], members, torch.zeros((), dtype=members.dtype))
        lam = torch.where(valid, lam, torch.zeros_like(lam))
    coef = lam / (m * member_total)  # [m]
    c0 = (1.0 - lam.mean()) / public_total.reshape(())
    if use_fused(public, members):
        out = np.empty(public.shape[-1], dtype=np.float64)
        fused.mix_row(_np(public), float(c0), _np(members), _np(coef), out)
        return torch.from_numpy(out)
    return torch.addcmul(coef @ members.to(torch.float64), public.to(torch.float64), c0)
