"""From an attack's hits to an epsilon lower bound (docs/privacy.md section 13, eqs. (A1)-(A3)).

An (epsilon, delta)-DP mechanism bounds every test that tries to tell neighbouring datasets D
and D' apart from its output: for the rejection region of any test,

    TPR <= e^epsilon FPR + delta,                                                    (A1)

TPR the probability of rejecting under D', FPR under D (Kairouz, Oh & Viswanath 2015, Theorem
2.4; the hypothesis-testing reading of DP used by auditing work since Jagielski, Ullman & Oprea
2020). With ``tp`` rejections in ``n1`` independent runs under D' and ``fp`` in ``n0`` under D,
one-sided Clopper-Pearson bounds hold with probability at least 1 - beta each,

    TPR >= TPR_lo = BetaInv(beta; tp, n1 - tp + 1),  FPR <= FPR_hi = BetaInv(1 - beta; fp + 1, n0 - fp),  (A2)

so, both holding, (A1) gives

    epsilon >= log((TPR_lo - delta) / FPR_hi)                                        (A3)

for any mechanism that is (epsilon, delta)-DP: an audit whose bound (A3) exceeds the claimed
epsilon has found the claim false (at confidence 1 - 2 beta). Pure math, no torch: the
regularised incomplete beta function by its continued fraction (Numerical Recipes' betacf,
modified Lentz) and its inverse by bisection (which keeps the conservative end).
"""

from __future__ import annotations

import math

from pmixed.errors import ConfigError

__all__ = ["betainc", "clopper_pearson_lower", "clopper_pearson_upper", "epsilon_lower_bound"]

_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"betainc({a}, {b}, {x}): continued fraction did not converge")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), a, b > 0, x in [0, 1]."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _beta_quantile(p: float, a: float, b: float, *, upper_end: bool) -> float:
    """x with I_x(a, b) = p by bisection (I is increasing in x); ``upper_end``: return the bracket's
    upper end (an upper confidence bound stays an upper bound), else its lower end."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if betainc(a, b, mid) < p:
            lo = mid
        else:
            hi = mid
    return hi if upper_end else lo


def _check_counts(k: int, n: int, beta: float) -> None:
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(name, f"must be an integer >= 0, got {v!r}")
    if n < 1 or k > n:
        raise ConfigError("k", f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ConfigError("beta", f"must lie in (0, 1), got {beta!r}")


def clopper_pearson_lower(k: int, n: int, beta: float) -> float:
    """One-sided lower bound on a Bernoulli rate from k successes in n trials, holding with
    probability >= 1 - beta: BetaInv(beta; k, n - k + 1), 0 when k = 0 (eq. (A2))."""
    _check_counts(k, n, beta)
    if k == 0:
        return 0.0
    return _beta_quantile(beta, k, n - k + 1, upper_end=False)


def clopper_pearson_upper(k: int, n: int, beta: float) -> float:
    """One-sided upper bound on a Bernoulli rate from k successes in n trials, holding with
    probability >= 1 - beta: BetaInv(1 - beta; k + 1, n - k), 1 when k = n (eq. (A2))."""
    _check_counts(k, n, beta)
    if k == n:
        return 1.0
    return _beta_quantile(1.0 - beta, k + 1, n - k, upper_end=True)


def epsilon_lower_bound(tp: int, n1: int, fp: int, n0: int, delta: float, beta: float) -> float:
    """Eq. (A3): the epsilon that any (epsilon, delta)-DP mechanism must have for a test with
    ``tp`` of ``n1`` rejections under D' and ``fp`` of ``n0`` under D, at confidence 1 - 2 beta
    (two Clopper-Pearson bounds, each at 1 - beta); 0 when the test shows nothing."""
    if not (isinstance(delta, (int, float)) and 0.0 <= delta < 1.0):
        raise ConfigError("delta", f"must lie in [0, 1), got {delta!r}")
    tpr = clopper_pearson_lower(tp, n1, beta)
    fpr = clopper_pearson_upper(fp, n0, beta)
    if tpr <= delta:
        return 0.0
    return max(0.0, math.log((tpr - delta) / fpr))
