"""The mechanism's parameters: what the projection enforces and what the bound is computed from.

A PMixED query (docs/privacy.md, section 2) draws each of the N members independently with
probability q, moves each drawn member's distribution p_i towards the public p_0,

    pbar_i = lam_i * p_i + (1 - lam_i) * p_0,

and releases the average of the drawn pbar_i (p_0 when none is drawn). The projection chooses
the largest lam_i that satisfies the *ball* (eq. (B1)-(B2)):

    lam_i <= lam_max                                              (B1)
    lam_i**k * E_{y ~ p_0} |p_i(y) / p_0(y) - 1|**k <= tau_k      for k = 2..K   (B2)

The per-query RDP bound (privacy/mixture_bound.py, eq. (R3)) is a function of (N, q, lam_max,
tau_2..tau_K) only, never of the realised draw: this is what keeps it data-independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pmixed.errors import ConfigError


def check_ensemble(ensemble_size: int, sample_rate: float) -> None:
    if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
        raise ConfigError("ensemble_size", f"must be an integer >= 1, got {ensemble_size!r}")
    if (
        not isinstance(sample_rate, (int, float))
        or math.isnan(sample_rate)
        or not 0.0 < sample_rate <= 1.0
    ):
        raise ConfigError("sample_rate", f"must lie in (0, 1], got {sample_rate!r}")


@dataclass(frozen=True)
class MechanismParams:
    """Everything the projection enforces and the accountant charges for.

    ``radii[k - 2]`` is tau_k, the bound (B2) at order k, for k = 2..max_order.
    """

    ensemble_size: int
    sample_rate: float
    lam_max: float
    radii: tuple[float, ...]

    def __post_init__(self) -> None:
        check_ensemble(self.ensemble_size, self.sample_rate)
        if not (isinstance(self.lam_max, (int, float)) and 0.0 < self.lam_max <= 1.0):
            raise ConfigError("lam_max", f"must lie in (0, 1], got {self.lam_max!r}")
        if len(self.radii) < 1:
            raise ConfigError("radii", "at least tau_2 is needed")
        for k, tau in enumerate(self.radii, start=2):
            if not (isinstance(tau, (int, float)) and tau >= 0.0 and not math.isnan(tau)):
                raise ConfigError("radii", f"tau_{k} must be a number >= 0, got {tau!r}")
        object.__setattr__(self, "radii", tuple(float(t) for t in self.radii))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "lam_max", float(self.lam_max))

    @property
    def max_order(self) -> int:
        """K: the highest order at which (B2) is enforced, hence the highest order with a claim."""
        return 1 + len(self.radii)

    def tau(self, k: int) -> float:
        return self.radii[k - 2]

    def renyi_radius(self, k: int) -> float:
        """An upper bound on D_k(pbar_i || p_0) implied by (B2) (docs/privacy.md, eq. (B3)):
        by Minkowski, (E (pbar/p0)^k)^(1/k) <= 1 + tau_k^(1/k), so
        D_k <= k/(k-1) * log(1 + tau_k^(1/k))."""
        return k / (k - 1) * math.log1p(self.tau(k) ** (1.0 / k))

    def expected_members(self) -> float:
        return self.ensemble_size * self.sample_rate
