"""The original research code's accounting rules, kept ONLY so that tests and benchmarks can show
what they get wrong (REFERENCE.md section 4, defects 1-2). Never used to charge anything.

- eps_P(k; n, beta) = 1/(k-1) log((n-1)/n + exp((k-1) 4 k beta)/n) for n >= 2; k beta for n = 1; 0 for n = 0.
- eps_sub(a) = 1/(a-1) log[(1-q)^(a-1)(1+(a-1)q) + sum_{k=2..a} C(a,k)(1-q)^(a-k) q^k exp((k-1) eps_P(k))].
- beta is re-solved from the realised number n of drawn members so that eps_sub(a) = rho / T,
  and the ball Dsym_a(pbar, p_0) <= a beta is enforced at order a only.
"""

from __future__ import annotations

import math


def eps_p(k: int, n: int, beta: float) -> float:
    if n <= 0:
        return 0.0
    if n == 1:
        return k * beta
    return math.log((n - 1) / n + math.exp((k - 1) * 4 * k * beta) / n) / (k - 1)


def eps_sub(alpha: int, q: float, n: int, beta: float) -> float:
    total = (1 - q) ** (alpha - 1) * (1 + (alpha - 1) * q)
    for k in range(2, alpha + 1):
        total += math.comb(alpha, k) * (1 - q) ** (alpha - k) * q**k * math.exp((k - 1) * eps_p(k, n, beta))
    return math.log(total) / (alpha - 1)


def solve_beta(alpha: int, q: float, n: int, per_query: float, iters: int = 200, hi: float = 10.0) -> float:
    """The beta with eps_sub(alpha; n, beta) = per_query: bisection on [0, hi], ``iters`` steps, as
    the original (its scipy ``bisect(f, 0, 5, maxiter=20)`` is ``iters=20, hi=5.0`` up to which
    end of the last bracket is returned: here its midpoint, defect 5)."""
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            val = eps_sub(alpha, q, n, mid)
        except OverflowError:
            val = math.inf
        if val > per_query:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2  # the original returns a midpoint (defect 5)


def reference_budget(epsilon: float = 8.0, delta: float = 1e-5, alpha: int = 3) -> float:
    """The original's RDP budget: eps_RDP = eps - log((a-1)/a) + (log delta + log a)/(a-1)."""
    return epsilon - math.log((alpha - 1) / alpha) + (math.log(delta) + math.log(alpha)) / (alpha - 1)
