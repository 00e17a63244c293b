"""The original research code's release rules, in numpy (REFERENCE.md section 4, defects 1-2):
beta re-solved from the realised number of drawn members; the symmetric ball enforced at order
alpha only, by bisection on the mixing weight (here returning the feasible end, so that the
failure shown is the rules', not defect 5's)."""

from __future__ import annotations

import numpy as np

from pmixed.privacy.original_rules import solve_beta


def renyi_np(p, q, a):
    mask = p > 0
    return np.log(np.sum(p[mask] ** a * q[mask] ** (1 - a))) / (a - 1)


def dsym(p, q, a):
    return max(renyi_np(p, q, a), renyi_np(q, p, a))


def project_original(public, member, alpha, beta, iters=60):
    if dsym(member, public, alpha) <= alpha * beta:
        return member
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if dsym(mid * member + (1 - mid) * public, public, alpha) <= alpha * beta:
            lo = mid
        else:
            hi = mid
    return lo * member + (1 - lo) * public


def original_release_fn(alpha, q, per_query, fixed_beta=None):
    def fn(public, drawn):
        n = drawn.shape[0]
        if n == 0:
            return public
        beta = fixed_beta if fixed_beta is not None else solve_beta(alpha, q, n, per_query)
        return np.mean([project_original(public, m, alpha, beta) for m in drawn], axis=0)

    return fn
