"""AdaptivePMixED.answer's budget checks (the whole-interaction exact tests are
tests/exact/test_exact_adaptive.py)."""

from __future__ import annotations

import pytest
import torch

from pmixed.errors import LedgerError
from pmixed.mechanism.adaptive import AdaptivePMixED
from pmixed.privacy.accountant import RdpAccountant


def test_answer_refuses_a_budget_without_its_filter_before_charging():
    mech = AdaptivePMixED(epsilon=8.0, delta=1e-5, private_queries=4, ensemble_size=2, sample_rate=0.5, alpha=4)
    plain = RdpAccountant(epsilon=8.0, delta=1e-5)  # the best-order rule: unsound for varying costs
    pub = torch.full((3,), 1 / 3, dtype=torch.float64)
    with pytest.raises(LedgerError, match="Renyi filter"):
        mech.answer(plain, mech.new_screen(), pub, lambda ids: pub.expand(len(ids), -1))
    assert plain.epsilon_spent() == 0.0
    ok = RdpAccountant(epsilon=8.0, delta=1e-5, rule=mech.rule)
    mech.answer(ok, mech.new_screen(torch.Generator().manual_seed(0)), pub, lambda ids: pub.expand(len(ids), -1),
                generator=torch.Generator().manual_seed(1))
    assert ok.epsilon_spent() > 0.0  # a round was opened and charged
