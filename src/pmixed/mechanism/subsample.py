"""Poisson subsampling of the ensemble: each member is drawn independently with probability q.

Never with replacement (a member counts at most once). In serving mode the coin flips come from
the operating system's CSPRNG (``secrets``); a ``torch.Generator`` makes them reproducible for
tests and experiments.
"""

from __future__ import annotations

import secrets

import torch

from pmixed.mechanism import fused

_RESOLUTION = 2**53


def _csprng_uniform(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) float64 values from the OS CSPRNG, 53 bits each."""
    n = 1
    for s in shape:
        n *= s
    raw = secrets.token_bytes(8 * n)
    ints = torch.frombuffer(bytearray(raw), dtype=torch.int64).reshape(shape) if n else torch.zeros(shape, dtype=torch.int64)
    return (ints & (_RESOLUTION - 1)).to(torch.float64) / _RESOLUTION


def uniforms(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform [0, 1) float64 values of ``shape``: the OS CSPRNG, or ``generator`` (experiments)."""
    if generator is None:
        return _csprng_uniform(shape)
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def poisson_mask(
    ensemble_size: int,
    sample_rate: float,
    positions: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Independent Bernoulli(q) inclusion: [N] (or [positions, N]) bool."""
    shape = (ensemble_size,) if positions is None else (positions, ensemble_size)
    if sample_rate >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    return uniforms(shape, generator) < sample_rate


def poisson_draw(ensemble_size: int, sample_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Distinct member indices included in one query's draw: LongTensor [m], sorted, m may be 0."""
    return torch.nonzero(poisson_mask(ensemble_size, sample_rate, None, generator)).flatten()


def sample_token(dist: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Sample one token id from a released distribution [V] (CSPRNG unless a generator is given)."""
    u = _csprng_uniform((1,)) if generator is None else torch.rand(1, generator=generator, dtype=torch.float64)
    # the CDF's entries <= u * total, counted over the whole vector: a binary search would read
    # the CDF along a path that depends on it (constant time: docs/privacy.md section 8b)
    x = dist.to(torch.float64)
    if x.device.type == "cpu" and x.dim() == 1 and fused.enabled():
        idx = int(fused.sample_index(x.contiguous().numpy(), float(u)))
    else:
        cdf = torch.cumsum(x, dim=-1)
        idx = int((cdf <= u * cdf[-1]).sum())
    return min(idx, dist.shape[-1] - 1)
