"""Post-processing of the released distribution: temperature, top-k, top-p (free, docs/privacy.md).

Each acts on the released distribution M only (never on a member's), so the token sampled from
the result is a function of M and fresh randomness: covered by the guarantee on M at no cost.
"""

from __future__ import annotations

import torch

from pmixed.mechanism.subsample import sample_token

__all__ = ["postprocess", "sample"]


def postprocess(dist: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """dist [V] (a released distribution) -> [V] float64 after temperature (M^(1/t), renormalised),
    then top-k (keep the k most likely, ties by index), then top-p (the smallest prefix of the
    sorted distribution with mass >= top_p). The defaults return ``dist`` unchanged."""
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must lie in (0, 1]")
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    out = dist.to(torch.float64)
    if temperature != 1.0:
        out = torch.softmax(torch.log(out.clamp(min=1e-300)) / temperature, dim=-1)
    V = out.shape[-1]
    if 0 < top_k < V:
        keep = torch.topk(out, top_k, sorted=False).indices
        masked = torch.zeros_like(out)
        masked[keep] = out[keep]
        out = masked / masked.sum()
    if top_p < 1.0:
        vals, idx = torch.sort(out, descending=True, stable=True)
        cum = torch.cumsum(vals, dim=-1)
        n_keep = int(torch.searchsorted(cum, torch.tensor([top_p * float(cum[-1])], dtype=torch.float64)).item()) + 1
        masked = torch.zeros_like(out)
        sel = idx[: min(n_keep, V)]
        masked[sel] = out[sel]
        out = masked / masked.sum()
    return out


def sample(dist: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token from the post-processed released distribution (CSPRNG unless a generator)."""
    return sample_token(postprocess(dist, temperature=temperature, top_k=top_k, top_p=top_p), generator)
