"""The projection of a member towards the public distribution (docs/privacy.md, eq. (P1)).

    pbar_i = lam_i p_i + (1 - lam_i) p_0,
    lam_i  = min(lam_max, min_{k=2..K} (tau_k / a_k(p_i; p_0))^(1/k))

is the largest mixing weight that satisfies the ball (B1)-(B2) at every order the bound uses:
lam^k a_k <= tau_k for each k, because E_{p_0}|pbar_i/p_0 - 1|^k = lam^k a_k exactly. The root
is closed-form, so there is no bisection and no midpoint that could land outside the ball. A
relative margin (1e-9) shrinks lam against the rounding of a_k in float64 (charge more, never less).
"""

from __future__ import annotations

import numpy as np
import torch

from pmixed.mechanism import fused
from pmixed.mechanism.divergence import abs_moments
from pmixed.privacy.params import MechanismParams

MARGIN = 1e-9


def lambdas_from_moments(moments: torch.Tensor, params: MechanismParams) -> torch.Tensor:
    """moments: [..., K-1] = a_2..a_K -> lam: [..., ] float64, eq. (P1)."""
    K = params.max_order
    if moments.shape[-1] != K - 1:
        raise ValueError(f"expected {K - 1} moments (orders 2..{K}), got {moments.shape[-1]}")
    if moments.device.type == "cpu" and fused.enabled():  # the same rules in one compiled loop
        flat = moments.reshape(-1, K - 1).to(torch.float64).contiguous().numpy()
        out = np.empty(flat.shape[0], dtype=np.float64)
        fused.lambdas(flat, np.log(np.asarray(params.radii, dtype=np.float64)),
                      params.lam_max * (1.0 - MARGIN), MARGIN, out)
        return torch.from_numpy(out).reshape(moments.shape[:-1])
    taus = torch.tensor(params.radii, dtype=torch.float64, device=moments.device)  # [K-1]
    ks = torch.arange(2, K + 1, dtype=torch.float64, device=moments.device)  # [K-1]
    a = moments * (1.0 + MARGIN)
    # (tau/a)^(1/k) in log space; a == 0 gives +inf (no constraint); a == inf gives 0.
    with torch.no_grad():
        log_bound = (torch.log(taus) - torch.log(a)) / ks  # [..., K-1]
        log_bound = torch.nan_to_num(log_bound, nan=-torch.inf)
        lam = torch.exp(log_bound.min(dim=-1).values)
    lam = lam.clamp(max=params.lam_max * (1.0 - MARGIN))
    return torch.nan_to_num(lam, nan=0.0)


def mixing_weights(public: torch.Tensor, members: torch.Tensor, params: MechanismParams) -> torch.Tensor:
    """lam for each member row: public [..., V], members [..., V] (normalised float64) -> [...]."""
    return lambdas_from_moments(abs_moments(public, members, params.max_order), params)


def project(public: torch.Tensor, members: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """pbar = lam p + (1 - lam) p_0 with lam [...] broadcast over V."""
    lam = lam.unsqueeze(-1)
    return lam * members + (1.0 - lam) * public
