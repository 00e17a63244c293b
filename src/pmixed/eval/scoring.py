"""Teacher-forced private scoring of one block: L-1 charged queries, released target probabilities.

The paper's evaluation protocol on an :class:`pmixed.engine.PrivatePredictor`: each position of
the block is one query; the budget is checked, the drawn members run (only the drawn pairs:
``block_stats(average=False)``), the mechanism is applied, the charge is committed, and only then
are the probabilities returned.
"""

from __future__ import annotations

import torch

from pmixed.engine import PrivatePredictor
from pmixed.eval.block_stats import block_stats
from pmixed.mechanism.teacher_forcing import released_target_probs

__all__ = ["score_block"]


@torch.no_grad()
def score_block(predictor: PrivatePredictor, block: torch.Tensor, *, label: str = "score") -> torch.Tensor:
    """block [L] -> the released probability of each true next token [L-1] float64."""
    T = block.shape[0] - 1
    mech = predictor.mechanism
    if not hasattr(mech, "draw_block"):
        raise TypeError("score_block scores plain PMixED; screened PMixED is scored by "
                        "pmixed.eval.perplexity.run_evaluation (its queries are answered in order)")
    predictor.check_budget(T)
    mask = mech.draw_block(T, predictor.generator)  # [T, N]
    stats = block_stats(predictor.runtime, block, max_order=mech.params.max_order, needed=mask,
                        average=False).stats
    probs, _ = released_target_probs(stats, mask, mech.params)
    predictor.charge(T, label)
    return probs
