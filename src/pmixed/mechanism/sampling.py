"""Temperature, top-k, top-p on a distribution, and sampling a token from it, in constant time.

Not free under the guarantee when applied to a draw's released mixture M (M1): the token's law
becomes E_S[f(M_S)], which the proof does not cover (docs/privacy.md section 1;
tests/exact/test_exact_sampling.py), so serving and generation use the identity (temperature 1,
top_k 0, top_p 1) outside seeded experiments; the sampling itself is the same either way.
"""

from __future__ import annotations

import numpy as np
import torch

from pmixed.mechanism import fused
from pmixed.mechanism.subsample import sample_token

__all__ = ["postprocess", "sample"]


# exp of a log-ratio below this is set to 0: e^-600 / V stays far above the smallest normal
# float64 (2.2e-308), so temperature scaling makes no subnormal (whose arithmetic is slow)
_EXP_FLOOR = -600.0
_BITS = 63  # a non-negative float64's bit pattern, read as int64, orders as the value does


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 [V] -> int64 [V] in the same order (IEEE 754: +0 -> 0)."""
    return x.contiguous().view(torch.int64)


def _value(bits: int) -> float:
    """The float64 whose bit pattern is ``bits``."""
    return float(np.int64(bits).view(np.float64))


def _largest_threshold(bits: torch.Tensor, enough) -> torch.Tensor:
    """The largest t in [0, 2^63) with ``enough(bits >= t)`` (a monotone predicate, true at 0),
    built bit by bit from the top: 63 rounds of the same whole-vector operations whatever the
    values. -> 0-dim int64 tensor. (The torch reference of ``fused.count_threshold`` /
    ``fused.mass_threshold``, used where the fused kernels are not.)"""
    t = torch.zeros((), dtype=torch.int64, device=bits.device)
    for b in range(_BITS - 1, -1, -1):
        cand = t | (1 << b)
        t = torch.where(enough(bits >= cand), cand, t)
    return t


def _keep(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    masked = torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return masked / masked.sum()


def _top_k_mask(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries, ties at the k-th value lowest index first (``fused.keep_top_k``'s
    torch reference) -> bool [V]."""
    v = _largest_threshold(bits, lambda ge: ge.sum() >= k)  # the k-th largest value's bits
    above, tie = bits > v, bits == v
    return above | (tie & (torch.cumsum(tie, 0) <= k - above.sum()))


def _top_p_mask(bits: torch.Tensor, x: torch.Tensor, target: float) -> torch.Tensor:
    """The smallest prefix by value (ties by index) with mass >= target (``fused.keep_top_p``'s
    torch reference) -> bool [V]."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    v = _largest_threshold(bits, lambda ge: torch.where(ge, x, zero).sum() >= target)
    above, tie = bits > v, bits == v
    before = torch.where(above, x, zero).sum() + torch.cumsum(torch.where(tie, x, zero), 0) - x
    return above | (tie & (before < target))  # an entry is kept while the mass before it is short


def postprocess(dist: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """dist [V] (a released distribution) -> [V] float64 after temperature (M^(1/t), renormalised;
    entries below e^-600 of the largest become 0), then top-k (keep the k most likely, ties by
    index), then top-p (the smallest prefix of the distribution sorted by probability, ties by
    index, with mass >= top_p). The defaults return ``dist`` unchanged.

    In constant time: what runs, on what shapes, does not depend on the values of ``dist``
    (which depend on the draw and on the members; a client that times tokens must learn nothing
    of them beyond the sampled token, docs/privacy.md section 8b). So no sort, top-k selection
    or data-dependent shape: the k-th largest value (top-k) and the top-p threshold are found by
    fixed-length bisection over the values' bit patterns, ties resolved by a running count or
    sum in index order (numba kernels in ``fused``, in place; a torch path elsewhere, the same
    rules); and no subnormal number is made (their arithmetic takes a slow path). Tests:
    tests/mechanism/test_sampling.py (equal to a sort-based reference; the same operations and
    shapes for any input; no subnormal; the sort-based version is caught)."""
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must lie in (0, 1]")
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    V = dist.shape[-1]
    changes = temperature != 1.0 or 0 < top_k < V or top_p < 1.0
    out = dist.to(torch.float64, copy=changes)  # [V]; when it changes, our own copy
    if temperature != 1.0:
        out.clamp_(min=1e-300).log_().div_(temperature)
        out.sub_(out.max())  # <= 0, the largest 0
        small = out <= _EXP_FLOOR  # [V] bool
        out.clamp_(min=_EXP_FLOOR).exp_().masked_fill_(small, 0.0)
        out.div_(out.sum())  # the sum is >= 1 (the largest entry's e^0)
    fast = out.device.type == "cpu" and fused.enabled()  # the fused kernels: the same rules, in place
    if 0 < top_k < V:
        if fast:
            v = _value(fused.count_threshold(_bits(out).numpy(), top_k))
            fused.keep_top_k(out.numpy(), v, top_k)
            out.div_(out.sum())  # the torch path's sum, so both paths give the same numbers
        else:
            out = _keep(out, _top_k_mask(_bits(out), top_k))
    if top_p < 1.0:
        target = top_p * float(out.sum())
        if fast:
            v = _value(fused.mass_threshold(_bits(out).numpy(), out.numpy(), target))
            fused.keep_top_p(out.numpy(), v, target)
            out.div_(out.sum())
        else:
            out = _keep(out, _top_p_mask(_bits(out), out, target))
    return out


def sample(dist: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token from the post-processed released distribution (CSPRNG unless a generator)."""
    return sample_token(postprocess(dist, temperature=temperature, top_k=top_k, top_p=top_p), generator)
