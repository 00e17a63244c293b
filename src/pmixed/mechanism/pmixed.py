"""``pmixed.PMixED``: the stable Python contract for one PMixED mechanism.

    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=80, sample_rate=0.03)
    S = mech.draw()                      # LongTensor of distinct member indices (Poisson)
    dist = mech.release(public, members[S])  # the exact distribution the token is sampled from
    mech.query_rdp([2, 3, 4])            # RDP charged per query at each order (inf = no claim)
    mech.charge(ledger.orders, count=5)  # 5 queries as a charge for a ledger
    mech.epsilon_after(1024)             # <= epsilon

The object holds no budget state: charging is the ledger's job (pmixed.privacy.ledger).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pmixed.errors import LedgerError
from pmixed.mechanism.release import release, release_rows
from pmixed.mechanism.subsample import poisson_draw, poisson_mask
from pmixed.privacy.acceptance import BEST_ORDER, RenyiFilterRule
from pmixed.privacy.accountant import DEFAULT_ORDERS, RdpCharge
from pmixed.privacy.calibration import (
    DEFAULT_LAM_MAX,
    DEFAULT_TAIL,
    Calibration,
    calibrate,
    epsilon_after,
    max_queries,
)
from pmixed.privacy.mixture_bound import pmixed_charge, query_rdp
from pmixed.privacy.params import MechanismParams


class PMixED:
    def __init__(
        self,
        *,
        epsilon: float,
        delta: float,
        query_budget: int,
        ensemble_size: int,
        sample_rate: float,
        alpha: float | None = None,
        lam_max: float = DEFAULT_LAM_MAX,
        tail: float = DEFAULT_TAIL,
        spent: Mapping[float, float] | None = None,
    ):
        """``spent``: order -> RDP already charged to the same budget (an accounted tuning,
        docs/privacy.md section 12), composed with the query_budget queries by the calibration;
        the budget must then be the Renyi filter at the calibration's order (``check_rule``)."""
        self.calibration: Calibration = calibrate(
            epsilon=epsilon, delta=delta, query_budget=query_budget, ensemble_size=ensemble_size,
            sample_rate=sample_rate, alpha=alpha, lam_max=lam_max, tail=tail, spent=spent)
        self.params: MechanismParams = self.calibration.params
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.query_budget = int(query_budget)
        self.ensemble_size = int(ensemble_size)
        self.sample_rate = float(sample_rate)
        self.spent = None if spent is None else dict(spent)
        self._charges: dict[tuple[float, ...], RdpCharge] = {}  # one query's charge per grid of orders

    @classmethod
    def from_config(cls, privacy: Any, ensemble_size: int, **overrides: Any) -> PMixED:
        """The mechanism a ``[privacy]`` section (``pmixed.config.PrivacyConfig``) describes for
        an ensemble of ``ensemble_size`` members; ``overrides`` as in
        ``PrivacyConfig.calibration_kwargs``. The one way from a config to a mechanism."""
        return cls(**privacy.calibration_kwargs(ensemble_size, **overrides))

    @property
    def alpha(self) -> int:
        return self.calibration.alpha

    @property
    def rule(self) -> Any:
        """The acceptance rule for this mechanism's budget: the Renyi filter at the calibration's
        order for a tuned shape (``spent``), else the default best-order rule."""
        return BEST_ORDER if self.spent is None else RenyiFilterRule(self.alpha)

    def check_rule(self, budget: Any) -> None:
        """With ``spent`` (a tuned shape: the per-query cost depended on the tuning's output), a
        LedgerError unless ``budget`` is the Renyi filter at this calibration's order, the one the
        tuning fixed for every candidate (docs/privacy.md section 12); any rule otherwise."""
        if self.spent is None or budget.rule == self.rule:
            return
        raise LedgerError(
            f"a tuned shape needs a budget under the Renyi filter {self.rule.name!r} (its cost depended on the "
            f"tuning's output), but the ledger {getattr(budget, 'path', '')} uses the acceptance rule "
            f"{budget.rule.name!r}")

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Poisson draw of distinct member indices, LongTensor [m] (CSPRNG unless a generator)."""
        return poisson_draw(self.ensemble_size, self.sample_rate, generator)

    def draw_mask(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One query's Poisson draw as a mask: bool [N] (CSPRNG unless a generator)."""
        return poisson_mask(self.ensemble_size, self.sample_rate, None, generator)

    def draw_block(self, positions: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Independent draws for ``positions`` queries: bool [positions, N]."""
        return poisson_mask(self.ensemble_size, self.sample_rate, positions, generator)

    def release(self, public: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """public [V], members [m, V] (drawn members' distributions) -> [V] float64 distribution."""
        return release(public, members, self.params)

    def release_rows(self, public, member_rows, row_position, *, targets=None):
        """A block of queries as flat (member, position) rows; see release.release_rows."""
        return release_rows(public, member_rows, row_position, self.params, targets=targets)

    def charge(self, orders: Sequence[float] = DEFAULT_ORDERS, label: str = "", count: int = 1) -> RdpCharge:
        """``count`` queries as a charge (mechanism "pmixed" with its parameters); the curve is
        computed once per grid of orders."""
        key = tuple(orders)
        if key not in self._charges:
            self._charges[key] = pmixed_charge(self.params, 1, key)
        return dataclasses.replace(self._charges[key], count=count, label=label)

    def query_rdp(self, orders: Sequence[float]) -> list[float]:
        return [query_rdp(a, self.params) for a in orders]

    def epsilon_after(self, queries: int) -> float:
        return epsilon_after(self.params, queries, self.delta)

    def max_queries(self, epsilon: float | None = None) -> int:
        return max_queries(self.params, self.epsilon if epsilon is None else epsilon, self.delta)

    def __repr__(self) -> str:
        return (
            f"PMixED(epsilon={self.epsilon}, delta={self.delta}, query_budget={self.query_budget}, "
            f"ensemble_size={self.ensemble_size}, sample_rate={self.sample_rate}, alpha={self.alpha}, "
            f"lam_max={self.params.lam_max})"
        )
