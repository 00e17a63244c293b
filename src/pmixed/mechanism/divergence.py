"""Divergences between next-token distributions, in float64.

``renyi_divergence`` works in log space (logsumexp), for diagnostics, audits and tests.
``abs_moments`` computes the quantities the projection constrains (docs/privacy.md, eq. (B2)):

    a_k(p_i; p_0) = E_{y ~ p_0} |p_i(y) / p_0(y) - 1|^k,   k = 2..K.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_distribution_rows(p: torch.Tensor, name: str = "distribution") -> torch.Tensor:
    """Validate probabilities without copying them; returns the float64 row sums [..., 1]."""
    total = p.sum(dim=-1, keepdim=True, dtype=torch.float64)
    if p.numel() and (not bool((p.amin(dim=-1) >= 0).all()) or not bool(torch.isfinite(total).all())):
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    if bool((total <= 0).any()):
        raise ValueError(f"{name} has a row with zero total mass")
    return total


def as_distribution(p: torch.Tensor, name: str = "distribution") -> torch.Tensor:
    """Validate probabilities (any float dtype) and renormalise them in float64 along the last dim.

    Three passes over the input in its own dtype (min, float64 sum, dividing divide that promotes
    to float64), no float64 copy before the division: float32 -> float64 is exact, so the result
    is the same as p.to(float64) / p.to(float64).sum(-1)."""
    if not torch.is_tensor(p):
        p = torch.as_tensor(p)
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of probabilities, got {p.dtype}")
    if not p.numel():
        return p.to(torch.float64)
    # amin propagates nan; +inf shows in the (float64) total; -inf and negatives in the min
    total = check_distribution_rows(p, name)
    # one float64 copy, then an in-place division (a mixed-dtype division is ~3x slower on CPU);
    # float32 -> float64 is exact, so this is p.double() / p.double().sum(-1)
    out = p.to(torch.float64, copy=True)
    return out.div_(total)


def renyi_divergence(p: torch.Tensor, q: torch.Tensor, orders: Sequence[float]) -> torch.Tensor:
    """D_a(p || q) = 1/(a-1) log sum_y p^a q^(1-a), for each order a > 1, in log space.

    p, q: [..., V] probabilities -> [..., len(orders)] float64. inf where p has mass that q has not.
    """
    p = as_distribution(p, "p")
    q = as_distribution(q, "q")
    logp = torch.log(p)  # -inf where p == 0
    logq = torch.log(q)
    out = []
    for a in orders:
        a = float(a)
        if not a > 1.0:
            raise ValueError(f"Renyi orders must be > 1, got {a}")
        terms = a * logp + (1.0 - a) * logq  # [..., V]
        terms = torch.where(p > 0, terms, torch.full_like(terms, -torch.inf))
        # p > 0 and q == 0 gives +inf, as it should
        out.append(torch.logsumexp(terms, dim=-1) / (a - 1.0))
    return torch.stack(out, dim=-1)


def abs_moments(public: torch.Tensor, members: torch.Tensor, max_order: int) -> torch.Tensor:
    """a_k = E_{p_0} |p_i/p_0 - 1|^k for k = 2..max_order (eq. (B2)'s left side at lam = 1).

    public: [..., V], members: [..., V] (broadcastable; both already normalised float64).
    Returns [..., max_order - 1] float64. A member with mass where p_0 has none gets inf (the
    projection then answers with p_0 alone, lam = 0), never nan.
    """
    if max_order < 2:
        raise ValueError("max_order must be >= 2")
    if public.numel() and bool(public.amin() > 0):
        # fast path (p_0 > 0 everywhere: nothing to mask, nothing can escape): 2 + 2(K-1) passes
        ad = torch.addcdiv(public.new_tensor(-1.0), members, public).abs_()  # |p_i/p_0 - 1|
        w = public * ad  # p_0 |d|
        cols = [torch.linalg.vecdot(w, ad)]
        for _ in range(3, max_order + 1):
            cols.append(torch.linalg.vecdot(w.mul_(ad), ad))  # E p_0 |d|^k
        return torch.nan_to_num(torch.stack(cols, dim=-1), nan=torch.inf, posinf=torch.inf)
    pos = public > 0
    ratio = torch.where(pos, members / torch.where(pos, public, torch.ones_like(public)), 0.0)
    d = ratio.sub_(1.0)  # [..., V]; entries with p_0 == 0 are masked below
    ad = d.abs_()
    w = public * ad * ad  # [..., V]   p_0 |d|^2
    cols = [w.sum(dim=-1)]
    power = None
    for _ in range(3, max_order + 1):
        power = ad.clone() if power is None else power.mul_(ad)  # |d|^(k-2)
        cols.append(torch.linalg.vecdot(w, power))
    out = torch.stack(cols, dim=-1)  # [..., K-1]
    escaped = ((~pos) & (members > 0)).any(dim=-1, keepdim=True)  # [..., 1]
    out = torch.where(escaped, torch.full_like(out, torch.inf), out)
    return torch.nan_to_num(out, nan=torch.inf, posinf=torch.inf)
