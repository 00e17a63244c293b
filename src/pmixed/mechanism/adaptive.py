"""``pmixed.AdaptivePMixED``: screened PMixED spent through a Renyi filter (docs/privacy.md,
section 11).

    mech = AdaptivePMixED(epsilon=2.0, delta=1e-5, private_queries=256, ensemble_size=32,
                          sample_rate=0.5, screen_threshold=3.0)
    budget = RdpAccountant(epsilon=2.0, delta=1e-5, rule=mech.rule)   # or a Ledger(rule=mech.rule)
    screen = mech.new_screen()                  # one stream's screen state (engine-internal)
    # per query: open a round when none is open (charge first), then
    #   private = screen.decide(public_entropy(public), scores of screen.test_members)
    #   dist = mech.release(public, members[mech.draw()]) if private else public
    # or, all of it at once: mech.answer(budget, screen, public, member_probs)

Queries the screen sends to the public model run no member and cost nothing beyond their round;
a private query is one PMixED release (an independent Poisson draw) and closes its round. Each
round and its private release are one *unit*, charged when the round opens; the filter stops
the stream (answers from p_0 alone, or ends it) when the next unit would not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from pmixed.errors import LedgerError
from pmixed.mechanism.release import release
from pmixed.mechanism.screen import Screen, chi_square, member_score, public_entropy
from pmixed.mechanism.subsample import poisson_draw
from pmixed.privacy.acceptance import RenyiFilterRule
from pmixed.privacy.accountant import DEFAULT_ORDERS, RdpCharge
from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL
from pmixed.privacy.conversion import epsilon_at_order
from pmixed.privacy.screening import (
    AdaptiveCalibration,
    ScreenParams,
    adaptive_charge,
    calibrate_adaptive,
)

__all__ = ["AdaptivePMixED", "Answer"]


class Answer(NamedTuple):
    """One screened query's outcome inside the engine: the released distribution [V] float64,
    whether it was private, and whether a unit was charged for it (a round opened)."""

    dist: torch.Tensor
    private: bool
    charged: bool


class AdaptivePMixED:
    def __init__(
        self,
        *,
        epsilon: float,
        delta: float,
        private_queries: int,
        ensemble_size: int,
        sample_rate: float,
        screen_threshold: float = 0.0,
        screen_weight: float = 0.0,
        screen_epsilon: float = 0.0,
        screen_rate: float = 1.0,
        alpha: float | None = None,
        lam_max: float = DEFAULT_LAM_MAX,
        tail: float = DEFAULT_TAIL,
    ):
        screen = ScreenParams(ensemble_size, screen_threshold, screen_weight, screen_epsilon, screen_rate)
        self.calibration: AdaptiveCalibration = calibrate_adaptive(
            epsilon=epsilon, delta=delta, private_queries=private_queries, ensemble_size=ensemble_size,
            sample_rate=sample_rate, screen=screen, alpha=alpha, lam_max=lam_max, tail=tail)
        self.params = self.calibration.params
        self.release_params = self.params.release
        self.screen_params = screen
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.ensemble_size = int(ensemble_size)
        self.sample_rate = float(sample_rate)
        self.private_queries = int(private_queries)
        self._charges: dict[tuple[float, ...], RdpCharge] = {}  # one unit's charge per grid of orders

    @classmethod
    def from_config(cls, privacy: Any, ensemble_size: int, **overrides: Any) -> AdaptivePMixED:
        """The screened mechanism a ``[privacy]`` section describes (``PrivacyConfig.adaptive_kwargs``)."""
        return cls(**privacy.adaptive_kwargs(ensemble_size, **overrides))

    @property
    def order(self) -> int:
        """The Renyi filter's order, fixed by the configuration before any query."""
        return self.params.order

    @property
    def rule(self) -> RenyiFilterRule:
        """The acceptance rule every budget of this mechanism must use."""
        return RenyiFilterRule(self.order)

    def charge(self, orders=DEFAULT_ORDERS, label: str = "", count: int = 1) -> RdpCharge:
        """``count`` units (a unit: a screen round and its private release, charged when the round
        opens); the curve is computed once per grid of orders."""
        key = tuple(orders)
        if key not in self._charges:
            self._charges[key] = adaptive_charge(self.params, 1, key)
        return dataclasses.replace(self._charges[key], count=count, label=label)

    def check_rule(self, budget: Any) -> None:
        """LedgerError unless ``budget`` (a Ledger or RdpAccountant) uses this mechanism's filter."""
        if budget.rule != self.rule:
            raise LedgerError(
                f"screened PMixED needs a budget under its Renyi filter {self.rule.name!r}, but the ledger "
                f"{getattr(budget, 'path', '')} uses the acceptance rule {budget.rule.name!r}")

    def unit_rdp(self) -> float:
        return self.params.unit_rdp(self.order)

    def epsilon_after(self, units: int) -> float:
        """Epsilon certified by the filter after ``units`` units."""
        return 0.0 if units == 0 else epsilon_at_order(units * self.unit_rdp(), self.order, self.delta)

    def max_units(self) -> int:
        """The units the budget pays for: at least ``private_queries``."""
        return self.calibration.units_left(0.0)

    def new_screen(self, generator: torch.Generator | None = None) -> Screen:
        return Screen(self.screen_params, generator)

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The private release's Poisson draw, independent of the screen's (LongTensor [m])."""
        return poisson_draw(self.ensemble_size, self.sample_rate, generator)

    def release(self, public: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """public [V], members [m, V] -> the PMixED release [V] float64 (eq. (M1))."""
        return release(public, members, self.release_params)

    def answer(
        self,
        budget: Any,
        screen: Screen,
        public: torch.Tensor,
        member_probs: Callable[[torch.Tensor], torch.Tensor],
        *,
        generator: torch.Generator | None = None,
        label: str = "adaptive",
    ) -> Answer:
        """One screened query, charging ``budget`` (an RdpAccountant or Ledger under ``self.rule``)
        before anything is released. ``member_probs(ids [m]) -> [m, V]`` computes the named
        members' next-token distributions (only S_r's when the screen is private, and the drawn
        ones at a private query). Raises BudgetExhausted when a round must open and the next unit
        does not fit (nothing is released)."""
        self.check_rule(budget)  # LedgerError, as the engine and the scheduler say it
        charged = False
        if not screen.is_open:
            budget.charge(self.charge(budget.orders, label=label))  # BudgetExhausted propagates
            screen.open_round()
            charged = True
        scores = None
        if self.screen_params.private:
            ids = screen.test_members
            scores = (member_score(chi_square(public, member_probs(ids))) if ids.numel()
                      else torch.zeros(0, dtype=torch.float64))
        h = float(public_entropy(public[None])[0])
        if screen.decide(h, scores):
            drawn = self.draw(generator)
            members = member_probs(drawn) if drawn.numel() else public.new_zeros((0, public.shape[-1]))
            return Answer(self.release(public, members), True, charged)
        return Answer(self.release(public, public.new_zeros((0, public.shape[-1]))), False, charged)

    def __repr__(self) -> str:
        s = self.screen_params
        return (f"AdaptivePMixED(epsilon={self.epsilon}, delta={self.delta}, private_queries={self.private_queries}, "
                f"ensemble_size={self.ensemble_size}, sample_rate={self.sample_rate}, order={self.order}, "
                f"screen_threshold={s.threshold}, screen_weight={s.weight})")

