"""Exact enumeration of the PMixED release for tiny ensembles (N <= 5, V <= 4).

Every Poisson subset S of the N members is enumerated with its probability q^|S| (1-q)^(N-|S|);
the token's distribution is the exact mixture sum_S w(S) release(S). Renyi divergences between
the mixtures of neighbouring datasets are computed with mpmath at 60 digits. This is the oracle
the charged RDP is checked against (docs/privacy.md, section 6).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import mpmath
import numpy as np
import torch

mpmath.mp.dps = 60

ReleaseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (public [V], drawn [m, V]) -> [V]


def subset_weights(n: int, q: float):
    for mask in itertools.product((0, 1), repeat=n):
        k = sum(mask)
        w = (q**k) * ((1 - q) ** (n - k))
        if w > 0:
            yield [i for i in range(n) if mask[i]], w


def exact_mixture(public: np.ndarray, members: np.ndarray, q: float, release_fn: ReleaseFn) -> np.ndarray:
    """sum_S w(S) release(public, members[S]) [V] float64 (compensated sums)."""
    parts = [w * np.asarray(release_fn(public, members[S]), dtype=np.float64)
             for S, w in subset_weights(members.shape[0], q)]
    total = np.array([math.fsum(col) for col in zip(*parts)])
    return total / math.fsum(total)


def renyi(P: Sequence, Q: Sequence, order: int, precise: bool = False) -> float:
    """D_order(P || Q), inf if P has mass where Q has none. ``precise``: mpmath at 60 digits."""
    if precise:
        acc = mpmath.mpf(0)
        for p, q in zip(P, Q):
            if p == 0:
                continue
            if q == 0:
                return math.inf
            acc += mpmath.power(mpmath.mpf(float(p)), order) * mpmath.power(mpmath.mpf(float(q)), 1 - order)
        return float(mpmath.log(acc) / (order - 1))
    P = np.asarray(P, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    m = P > 0
    if np.any(Q[m] == 0):
        return math.inf
    # sum P^a Q^(1-a) - 1 = sum Q ((P/Q)^a - 1): no cancellation against the leading 1
    r = P[m] / Q[m]
    excess = math.fsum(Q[m] * np.expm1(order * np.log(r))) + math.fsum(Q[~m]) * -1.0
    return math.log1p(excess) / (order - 1)


def pmixed_release_fn(params) -> ReleaseFn:
    """Our mechanism's release, called exactly as the library calls it."""
    from pmixed.mechanism.release import release

    def fn(public: np.ndarray, drawn: np.ndarray) -> np.ndarray:
        return release(torch.from_numpy(public), torch.from_numpy(drawn), params).numpy()

    return fn


def worst_ratio_replace(public, members, replacement, index, q, release_fn, orders, charged, precise=False):
    """max over orders and both directions of exact D / charged, for replacing member ``index``."""
    other = members.copy()
    other[index] = replacement
    M = exact_mixture(public, members, q, release_fn)
    Mp = exact_mixture(public, other, q, release_fn)
    worst = 0.0
    for a, c in zip(orders, charged):
        for d in (renyi(M, Mp, a, precise), renyi(Mp, M, a, precise)):
            r = math.inf if c == 0 and d > 0 else float(d) / c if c > 0 else 0.0
            worst = max(worst, r)
    return worst


def worst_ratio_remove(public, members, index, q, release_fn_for_n, orders, charged_for_n):
    """Remove-one adjacency for mechanisms whose release depends on N (the original's claim)."""
    fewer = np.delete(members, index, axis=0)
    M = exact_mixture(public, members, q, release_fn_for_n(members.shape[0]))
    Mm = exact_mixture(public, fewer, q, release_fn_for_n(fewer.shape[0]))
    worst = 0.0
    for a in orders:
        c = charged_for_n(a)
        for d in (renyi(M, Mm, a), renyi(Mm, M, a)):
            worst = max(worst, float(d) / c)
    return worst


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def adversarial_search(objective, dim: int, rng: np.random.Generator, restarts: int, maxiter: int, scale=4.0):
    """Maximise ``objective(theta)`` with random restarts + Nelder-Mead (scipy)."""
    from scipy.optimize import minimize

    best_val, best_theta = -math.inf, None
    for _ in range(restarts):
        x0 = rng.normal(0.0, scale, size=dim)
        res = minimize(lambda t: -objective(t), x0, method="Nelder-Mead",
                       options={"maxiter": maxiter, "xatol": 1e-6, "fatol": 1e-9})
        for val, theta in ((-res.fun, res.x), (objective(x0), x0)):
            if val > best_val:
                best_val, best_theta = val, theta
    return best_val, best_theta
