"""Teacher-forcing statistics of one block: what the mechanism needs from the ensemble's forwards.

Every position t of a teacher-forced block is one query scored only at the true next token, so
the mechanism needs, per (position, member) pair, just the moments a_2..a_K (docs/privacy.md eq.
(B2)) and the member's target probability (``pmixed.mechanism.teacher_forcing.BlockStats``).
:func:`block_stats` computes them on an :class:`pmixed.models.runtime.EnsembleRuntime`, in
chunks of members, so that no [N, T, V] tensor is ever held; the statistics come back to the
CPU (small: [T, N, K-1] float64) whatever the runtime's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pmixed.mechanism.pairs import pair_moments, row_totals
from pmixed.mechanism.screen import public_entropy
from pmixed.mechanism.teacher_forcing import BlockStats, member_stats
from pmixed.models.runtime import PUBLIC, EnsembleRuntime, softmax_

__all__ = ["BlockResult", "block_stats"]


class BlockResult(NamedTuple):
    """stats: the mechanism's statistics over the first ``members`` members; extra_target:
    {extra adapter name: target prob [T]}; ensemble_target: the non-private ensemble average's
    target prob [T] (None when not computed)."""

    stats: BlockStats
    extra_target: dict[str, torch.Tensor]
    ensemble_target: torch.Tensor | None


@torch.no_grad()
def block_stats(
    runtime: EnsembleRuntime,
    block: torch.Tensor,
    *,
    max_order: int,
    needed: torch.Tensor | None = None,
    members: int | None = None,
    extras: Sequence[str] = (),
    chunk: int = 1,
    average: bool = True,
) -> BlockResult:
    """One teacher-forced block [L] -> statistics of its L-1 queries (all on the CPU).

    ``needed`` [T, members] limits the moment computation to the drawn pairs (default: all).

    ``average=False`` (with ``needed``) computes only what the mechanism reads: a member runs
    only if it is drawn somewhere in the block, only up to the last position it is drawn at
    (causal: the earlier positions' states do not depend on later tokens), and its LM head and
    softmax only at its drawn positions; member_target is nan at the other pairs and the
    ensemble average is not computed (None). The original ran every member over every position
    although about qN are drawn per token (REFERENCE.md section 4, item 6).
    """
    if not average and needed is None:
        raise ValueError("average=False needs `needed`: the drawn pairs to compute")
    n = runtime.n_members if members is None else members
    dev = runtime.device
    block = block.to(dev)
    needed = None if needed is None else needed.to(dev)
    inputs, targets = block[None, :-1], block[1:]  # [1, T], [T]
    T = targets.shape[0]
    public = runtime.probs(inputs, [PUBLIC])[0]  # [T, V] float32, kept in float32
    public_total = row_totals(public, "public")  # [T] float64 (public data: may refuse)
    public_target = public.gather(1, targets[:, None]).squeeze(1).double() / public_total
    extra_target = {}
    for name in extras:
        p = runtime.probs(inputs, [runtime.extra_index[name]])[0]  # [T, V] float32
        extra_target[name] = p.gather(1, targets[:, None]).squeeze(1).double() / p.sum(-1, dtype=torch.float64)
        del p
    moments = torch.empty(T, n, max_order - 1, dtype=torch.float64, device=dev)
    member_target = torch.empty(T, n, dtype=torch.float64, device=dev)
    stats_of = _member_stats if average else _drawn_stats
    for s in range(0, n, chunk):
        ids = list(range(s, min(n, s + chunk)))
        need = None if needed is None else needed[:, s : s + len(ids)]
        mom, mt = stats_of(runtime, inputs, ids, targets, public, public_total, need, max_order)
        moments[:, s : s + len(ids)] = mom
        member_target[:, s : s + len(ids)] = mt
    stats = BlockStats(moments.cpu(), member_target.cpu(), public_target.cpu(), public_entropy(public).cpu())
    extra_target = {name: t.cpu() for name, t in extra_target.items()}
    return BlockResult(stats, extra_target, stats.member_target.mean(dim=1) if average else None)


def _member_stats(
    runtime: EnsembleRuntime, inputs: torch.Tensor, ids: list[int], targets: torch.Tensor,
    public: torch.Tensor, public_total: torch.Tensor, need: torch.Tensor | None, max_order: int,
    positions: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments [T, c, K-1] and target probabilities [T, c] of members ``ids`` over one block
    (inputs [1, T], targets [T], public [T, V], need [T, c] or None). The LM head runs on
    ``positions`` positions at a time, so a member's [T, V] distribution is never held."""
    c, T = len(ids), targets.shape[0]
    split = runtime.split_head()
    if split is None:
        rows = runtime.probs(inputs.expand(c, -1), ids)  # [c, T, V]
        return member_stats(public, rows, targets, max_order, need, public_total)
    backbone, head = split
    moments = torch.empty(T, c, max_order - 1, dtype=torch.float64, device=runtime.device)
    member_target = torch.empty(T, c, dtype=torch.float64, device=runtime.device)
    with runtime.stacked.rows(torch.as_tensor(ids, dtype=torch.long)):
        hidden = backbone(input_ids=inputs.expand(c, -1), use_cache=False)[0]  # [c, T, H]
        for a in range(0, T, positions):
            sl = slice(a, min(T, a + positions))
            x = softmax_(head(hidden[:, sl]).float())  # [c, t, V]
            mom, mt = member_stats(public[sl], x, targets[sl], max_order,
                                   None if need is None else need[sl], public_total[sl])
            moments[sl], member_target[sl] = mom, mt
    return moments, member_target


def _drawn_stats(
    runtime: EnsembleRuntime, inputs: torch.Tensor, ids: list[int], targets: torch.Tensor,
    public: torch.Tensor, public_total: torch.Tensor, need: torch.Tensor, max_order: int,
    rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments and target probabilities of members ``ids`` at their drawn pairs only.

    need [T, c] bool. Returns moments [T, c, K-1] and member_target [T, c] float64 (on the
    runtime's device), nan where not drawn. The backbone runs on the members drawn somewhere
    in the block, over positions 0..(last drawn position); the LM head on ``rows`` drawn
    (position, member) pairs at a time. An invalid member row has inf moments and the public
    target (pmixed.mechanism.pairs).
    """
    c, T = len(ids), targets.shape[0]
    dev = runtime.device
    moments = torch.full((T, c, max_order - 1), float("nan"), dtype=torch.float64, device=dev)
    member_target = torch.full((T, c), float("nan"), dtype=torch.float64, device=dev)
    active = need.any(dim=0).nonzero().flatten()  # [a] chunk columns drawn somewhere
    if active.numel() == 0:
        return moments, member_target
    sub = need[:, active]  # [T, a]
    pos, col = sub.nonzero(as_tuple=True)  # [R] drawn pairs, by position
    last = int(pos.max()) + 1
    split = runtime.split_head()
    adapters = torch.as_tensor(ids, dtype=torch.long, device=dev)[active]
    public_target = public.gather(1, targets[:, None]).squeeze(1).double() / public_total  # [T]
    with runtime.stacked.rows(adapters):
        x_in = inputs[:, :last].expand(len(adapters), -1)  # [a, last]
        if split is None:
            hidden, head = runtime.model(input_ids=x_in, use_cache=False).logits, None  # [a, last, V]
        else:
            backbone, head = split
            hidden = backbone(input_ids=x_in, use_cache=False)[0]  # [a, last, H]
        for r in range(0, pos.shape[0], rows):
            p, j = pos[r : r + rows], col[r : r + rows]  # [n]
            x = softmax_((hidden[j, p] if head is None else head(hidden[j, p])).float())  # [n, V]
            mom, tot, valid = pair_moments(public, public_total, x, p, torch.arange(p.shape[0], device=dev),
                                           max_order)
            m = active[j]  # chunk columns
            moments[p, m] = mom
            mt = x.gather(1, targets[p][:, None]).squeeze(1).double() / tot.to(dev)
            member_target[p, m] = torch.where(valid.to(dev), mt, public_target[p])
    return moments, member_target
