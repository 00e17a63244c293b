"""The per-query RDP of the PMixED mechanism (docs/privacy.md, section 3).

Adjacency: replace-one-part. Two datasets are neighbours when they differ in the data of one
part D_i (any change of records or users inside one part, including emptying it), so that one
member p_i becomes p_i'. N and q are public and fixed.

For integer alpha >= 2 (docs/privacy.md, eq. (R3)):

    eps(alpha) = 1/(alpha-1) * log(1 + sum_{k=2..alpha} C(alpha,k) * c**k * gamma**(1-k) * 2**k * tau_k)

with
    c     = (1 - (1-q)**N) / N                (eq. (R1): the weight of one member in the release)
    gamma = 1 - lam_max * (1 - (1-q)**N)      (eq. (R2): the release is >= gamma * p_0 pointwise)

Orders that are not integers are bounded by the next integer (Renyi divergence is non-decreasing
in its order: van Erven & Harremoes 2014, Theorem 3). Orders above the projection's max_order
carry no claim (inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pmixed.errors import ConfigError
from pmixed.privacy.accountant import DEFAULT_ORDERS, RdpCharge, check_orders
from pmixed.privacy.params import MechanismParams, check_ensemble

#: The ``mechanism`` name of a PMixED query in a charge (and a ledger).
MECHANISM = "pmixed"


def _none_drawn(ensemble_size: int, sample_rate: float) -> float:
    """(1 - q)^N, the probability that no member is drawn, computed without cancellation."""
    if sample_rate >= 1.0:
        return 0.0
    return math.exp(ensemble_size * math.log1p(-sample_rate))


def _some_drawn(ensemble_size: int, sample_rate: float) -> float:
    """1 - (1 - q)^N without cancellation (expm1/log1p)."""
    if sample_rate >= 1.0:
        return 1.0
    return -math.expm1(ensemble_size * math.log1p(-sample_rate))


def member_weight(ensemble_size: int, sample_rate: float) -> float:
    """c = (1 - (1-q)^N) / N: the total weight of one member's pbar_i in the released mixture
    (eq. (R1)), q * E[1 / (1 + Binomial(N-1, q))]."""
    check_ensemble(ensemble_size, sample_rate)
    return _some_drawn(ensemble_size, sample_rate) / ensemble_size


def floor_weight(ensemble_size: int, sample_rate: float, lam_max: float) -> float:
    """gamma = 1 - lam_max (1 - (1-q)^N): the released distribution is >= gamma * p_0 (eq. (R2))."""
    check_ensemble(ensemble_size, sample_rate)
    return 1.0 - lam_max * _some_drawn(ensemble_size, sample_rate)


def moment_coefficients(order: int, ensemble_size: int, sample_rate: float, lam_max: float) -> list[float]:
    """coef_k = C(alpha, k) c^k gamma^(1-k) 2^k for k = 2..alpha (eq. (R3)); inf if gamma == 0."""
    c = member_weight(ensemble_size, sample_rate)
    gamma = floor_weight(ensemble_size, sample_rate, lam_max)
    out = []
    for k in range(2, order + 1):
        if gamma <= 0.0:
            out.append(math.inf)
            continue
        # log-space to stay finite for large orders
        log_coef = (
            math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
            + k * math.log(c) + (1 - k) * math.log(gamma) + k * math.log(2.0)
        )
        out.append(math.exp(log_coef))
    return out


def _integer_order(order: float) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, float)) or math.isnan(order):
        raise ConfigError("alpha", f"Renyi orders must be numbers > 1, got {order!r}")
    if not order > 1.0:
        raise ConfigError("alpha", f"Renyi orders must be > 1, got {order!r}")
    return max(2, math.ceil(order))


def query_rdp(order: float, params: MechanismParams) -> float:
    """Per-query RDP charged at ``order`` (eq. (R3)); inf where no claim is made."""
    if isinstance(order, (int, float)) and not isinstance(order, bool) and math.isinf(order) and order > 0:
        return math.inf
    a = _integer_order(order)
    if a > params.max_order:
        return math.inf
    coefs = moment_coefficients(a, params.ensemble_size, params.sample_rate, params.lam_max)
    terms = []
    for k, coef in zip(range(2, a + 1), coefs):
        tau = params.tau(k)
        if tau == 0.0:
            continue
        if math.isinf(coef):
            return math.inf
        terms.append(coef * tau)
    s = math.fsum(terms)
    if math.isinf(s):
        return math.inf
    return math.log1p(s) / (a - 1)


def query_rdp_curve(orders: Sequence[float], params: MechanismParams) -> list[float]:
    return [query_rdp(a, params) for a in orders]


def params_record(params: MechanismParams) -> dict:
    """``params`` as the JSON object a charge records (an infinite tau_k is written "inf")."""
    return {
        "ensemble_size": params.ensemble_size,
        "sample_rate": params.sample_rate,
        "lam_max": params.lam_max,
        "radii": [t if math.isfinite(t) else "inf" for t in params.radii],
    }


def params_from_record(record) -> MechanismParams:
    """The inverse of :func:`params_record` (replaying a recorded charge)."""
    try:
        radii = tuple(math.inf if t == "inf" else t for t in record["radii"])
        return MechanismParams(record["ensemble_size"], record["sample_rate"], record["lam_max"], radii)
    except (KeyError, TypeError) as e:
        raise ConfigError("params", f"not a PMixED parameter record: {record!r} ({e})") from None


def pmixed_charge(
    params: MechanismParams, count: int = 1, orders: Sequence[float] = DEFAULT_ORDERS, label: str = ""
) -> RdpCharge:
    """The charge of ``count`` PMixED queries with ``params``: the curve (R3) at ``orders``,
    recorded as mechanism "pmixed" with the parameters it was computed from."""
    if not isinstance(params, MechanismParams):
        raise TypeError(f"expected MechanismParams, got {type(params).__name__}")
    orders = check_orders(orders)
    return RdpCharge(
        orders, tuple(query_rdp(a, params) for a in orders), count, label,
        mechanism=MECHANISM, params=params_record(params),
    )
