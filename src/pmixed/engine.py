"""The private prediction engine: check budget -> forward -> mechanism -> charge durably -> release.

One copy of the base weights serves the public model p_0 (row id -1) and every member (row id i)
through :class:`pmixed.models.stacked_lora.StackedLoRA`; extra adapters (the fine-tuned and
DP-SGD baselines) ride on the same stack under their own names.

- :class:`EnsembleRuntime` computes what the mechanism needs: next-token distributions of the
  public model and of members, in chunks of rows so that no [N, T, V] tensor is ever held. It
  computes on the base model's device (a GPU when the run has one) and hands the mechanism its
  per-pair statistics ([T, N, K-1] float64, small) on the CPU.
- :class:`PrivatePredictor` answers queries: teacher-forced blocks (evaluation) and
  token-by-token generation with per-member KV caches that catch up lazily on the tokens they
  missed. Every query is charged to a durable :class:`pmixed.privacy.ledger.Ledger` before its
  answer leaves the object.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmixed.errors import BudgetExhausted
from pmixed.mechanism.pairs import pair_moments, row_totals
from pmixed.mechanism.pmixed import PMixED
from pmixed.mechanism.subsample import sample_token
from pmixed.mechanism.teacher_forcing import BlockStats, member_stats
from pmixed.models.device import module_device
from pmixed.privacy.accountant import RdpCharge
from pmixed.privacy.ledger import Ledger

PUBLIC = -1


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension in place (no second [..., V] buffer); returns ``x``."""
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


class EnsembleRuntime:
    """Base model + N stacked members (+ named extra adapters) on one copy of the weights."""

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        member_dirs: Sequence[str | os.PathLike[str]],
        extra_dirs: dict[str, str | os.PathLike[str]] | None = None,
    ):
        from pmixed.models.stacked_lora import StackedLoRA

        extra_dirs = dict(extra_dirs or {})
        dirs = [Path(d) for d in member_dirs] + [Path(d) for d in extra_dirs.values()]
        self.n_members = len(member_dirs)
        self.extra_index = {name: self.n_members + j for j, name in enumerate(extra_dirs)}
        self.tokenizer = tokenizer
        self.model = base_model
        self.model.eval()
        self.stacked = StackedLoRA.from_peft_dirs(base_model, dirs)
        self.device = module_device(base_model)

    @property
    def dtype(self) -> torch.dtype:
        """The precision the forwards run in (the base's parameters')."""
        return next(self.model.parameters()).dtype

    @classmethod
    def from_ensemble(cls, ensemble: Any, extra_dirs: dict[str, Any] | None = None) -> EnsembleRuntime:
        return cls(ensemble.base_model, ensemble.tokenizer, ensemble.adapter_paths, extra_dirs)

    @torch.no_grad()
    def probs(self, input_ids: torch.Tensor, adapter_ids: Sequence[int]) -> torch.Tensor:
        """Next-token probabilities [B, T, V] float32, on the runtime's device, for rows
        ``adapter_ids`` over ``input_ids`` [B, T]."""
        ids = torch.as_tensor(list(adapter_ids), dtype=torch.long)
        out = self.stacked(input_ids.to(self.device), ids, use_cache=False)
        x = out.logits if out.logits.dtype == torch.float32 else out.logits.float()  # [B, T, V]
        del out
        return softmax_(x)

    @torch.no_grad()
    def block_stats(
        self,
        block: torch.Tensor,
        *,
        max_order: int,
        needed: torch.Tensor | None = None,
        members: int | None = None,
        extras: Sequence[str] = (),
        chunk: int = 1,
        average: bool = True,
    ) -> tuple[BlockStats, dict[str, torch.Tensor], torch.Tensor | None]:
        """One teacher-forced block [L] -> statistics of its L-1 queries.

        Returns (stats over the first ``members`` members, {extra name: target prob [T]},
        ensemble-average target prob [T] (non-private baseline)), all on the CPU whatever the
        runtime's device. ``needed`` [T, members] limits the moment computation to the drawn pairs
        (default: all).

        ``average=False`` (with ``needed``) computes only what the mechanism reads: a member runs
        only if it is drawn somewhere in the block, only up to the last position it is drawn at
        (causal: the earlier positions' states do not depend on later tokens), and its LM head
        and softmax only at its drawn positions; member_target is nan at the other pairs and the
        ensemble average is not computed (None). The original ran every member over every
        position although about qN are drawn per token (REFERENCE.md section 4, item 6).
        """
        if not average and needed is None:
            raise ValueError("average=False needs `needed`: the drawn pairs to compute")
        n = self.n_members if members is None else members
        dev = self.device
        block = block.to(dev)
        needed = None if needed is None else needed.to(dev)
        inputs, targets = block[None, :-1], block[1:]  # [1, T], [T]
        T = targets.shape[0]
        public = self.probs(inputs, [PUBLIC])[0]  # [T, V] float32, kept in float32
        public_total = row_totals(public, "public")  # [T] float64
        public_target = public.gather(1, targets[:, None]).squeeze(1).double() / public_total
        extra_target = {}
        for name in extras:
            p = self.probs(inputs, [self.extra_index[name]])[0]  # [T, V] float32
            extra_target[name] = p.gather(1, targets[:, None]).squeeze(1).double() / p.sum(-1, dtype=torch.float64)
            del p
        moments = torch.empty(T, n, max_order - 1, dtype=torch.float64, device=dev)
        member_target = torch.empty(T, n, dtype=torch.float64, device=dev)
        for s in range(0, n, chunk):
            ids = list(range(s, min(n, s + chunk)))
            need = None if needed is None else needed[:, s : s + len(ids)]
            if average:
                mom, mt = self._member_stats(inputs, ids, targets, public, public_total, need, max_order)
            else:
                mom, mt = self._drawn_stats(inputs, ids, targets, public, public_total, need, max_order)
            moments[:, s : s + len(ids)] = mom
            member_target[:, s : s + len(ids)] = mt
        stats = BlockStats(moments.cpu(), member_target.cpu(), public_target.cpu())
        extra_target = {name: t.cpu() for name, t in extra_target.items()}
        return stats, extra_target, (stats.member_target.mean(dim=1) if average else None)

    def _split_head(self):
        """(backbone, head) when the logits are exactly head(backbone(x)[0]); None otherwise
        (models with logit soft-capping or scaling use the whole forward)."""
        cfg = getattr(self.model, "config", None)
        if any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")):
            return None
        backbone = getattr(self.model, "base_model", None)
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if backbone is None or backbone is self.model or head is None:
            return None
        return backbone, head

    def _member_stats(self, inputs, ids, targets, public, public_total, need, max_order, positions: int = 64):
        """Moments and target probabilities of members ``ids`` over one block. The LM head runs
        on ``positions`` positions at a time, so a member's [T, V] distribution is never held."""
        c, T = len(ids), targets.shape[0]
        split = self._split_head()
        if split is None:
            rows = self.probs(inputs.expand(c, -1), ids)  # [c, T, V]
            return member_stats(public, rows, targets, max_order, need, public_total)
        backbone, head = split
        moments = torch.empty(T, c, max_order - 1, dtype=torch.float64, device=self.device)
        member_target = torch.empty(T, c, dtype=torch.float64, device=self.device)
        with self.stacked.rows(torch.as_tensor(ids, dtype=torch.long)):
            hidden = backbone(input_ids=inputs.expand(c, -1), use_cache=False)[0]  # [c, T, H]
            for a in range(0, T, positions):
                sl = slice(a, min(T, a + positions))
                x = softmax_(head(hidden[:, sl]).float())  # [c, t, V]
                mom, mt = member_stats(public[sl], x, targets[sl], max_order,
                                       None if need is None else need[sl], public_total[sl])
                moments[sl], member_target[sl] = mom, mt
        return moments, member_target

    def _drawn_stats(self, inputs, ids, targets, public, public_total, need, max_order, rows: int = 64):
        """Moments and target probabilities of members ``ids`` at their drawn pairs only.

        need [T, c] bool. Returns moments [T, c, K-1] and member_target [T, c] float64 (on the
        runtime's device), nan where not drawn. The backbone runs on the members drawn somewhere
        in the block, over positions 0..(last drawn position); the LM head on ``rows`` drawn
        (position, member) pairs at a time.
        """
        c, T = len(ids), targets.shape[0]
        dev = self.device
        moments = torch.full((T, c, max_order - 1), float("nan"), dtype=torch.float64, device=dev)
        member_target = torch.full((T, c), float("nan"), dtype=torch.float64, device=dev)
        active = need.any(dim=0).nonzero().flatten()  # [a] chunk columns drawn somewhere
        if active.numel() == 0:
            return moments, member_target
        sub = need[:, active]  # [T, a]
        pos, col = sub.nonzero(as_tuple=True)  # [R] drawn pairs, by position
        last = int(pos.max()) + 1
        split = self._split_head()
        adapters = torch.as_tensor(ids, dtype=torch.long, device=dev)[active]
        with self.stacked.rows(adapters):
            x_in = inputs[:, :last].expand(len(adapters), -1)  # [a, last]
            if split is None:
                hidden, head = self.model(input_ids=x_in, use_cache=False).logits, None  # [a, last, V]
            else:
                backbone, head = split
                hidden = backbone(input_ids=x_in, use_cache=False)[0]  # [a, last, H]
            for r in range(0, pos.shape[0], rows):
                p, j = pos[r : r + rows], col[r : r + rows]  # [n]
                x = softmax_((hidden[j, p] if head is None else head(hidden[j, p])).float())  # [n, V]
                mom, tot = pair_moments(public, public_total, x, p, torch.arange(p.shape[0], device=dev), max_order)
                m = active[j]  # chunk columns
                moments[p, m] = mom
                member_target[p, m] = x.gather(1, targets[p][:, None]).squeeze(1).double() / tot
        return moments, member_target


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    epsilon_spent: float
    stopped: str  # "length", "eos" or "budget"
    members_drawn: list[list[int]] = field(default_factory=list)


class PrivatePredictor:
    """Answers queries with PMixED, charging each one to the ledger before it is released."""

    def __init__(
        self,
        runtime: EnsembleRuntime,
        mechanism: PMixED,
        ledger: Ledger,
        *,
        generator: torch.Generator | None = None,
    ):
        if mechanism.ensemble_size != runtime.n_members:
            from pmixed.errors import EnsembleMismatch

            raise EnsembleMismatch(
                f"mechanism calibrated for N={mechanism.ensemble_size} but the ensemble has "
                f"{runtime.n_members} members"
            )
        self.runtime = runtime
        self.mechanism = mechanism
        self.ledger = ledger
        self.generator = generator  # None: CSPRNG (serving); a seeded one for experiments
        self._rdp = tuple(mechanism.query_rdp(ledger.orders))

    def _charge(self, count: int, label: str) -> None:
        """Durably record ``count`` queries; raises BudgetExhausted (nothing recorded) if over."""
        self.ledger.charge(RdpCharge(self.ledger.orders, self._rdp, count=count, label=label))

    def check_budget(self, count: int) -> None:
        charge = RdpCharge(self.ledger.orders, self._rdp, count=count, label="check")
        if not self.ledger.can_afford(charge):
            raise BudgetExhausted(self.ledger.epsilon_spent(), self.ledger.epsilon_if(charge), self.ledger.epsilon)

    @torch.no_grad()
    def score_block(self, block: torch.Tensor, *, label: str = "score") -> torch.Tensor:
        """Teacher-forced: the released probability of each true next token of ``block`` [L].

        L-1 queries; the budget is checked first, the members are run, the mechanism applied,
        the charge committed, and only then are the probabilities returned.
        """
        T = block.shape[0] - 1
        self.check_budget(T)
        mask = self.mechanism.draw_block(T, self.generator)  # [T, N]
        stats, _, _ = self.runtime.block_stats(block, max_order=self.mechanism.params.max_order, needed=mask)
        from pmixed.mechanism.teacher_forcing import released_target_probs

        probs, _ = released_target_probs(stats, mask, self.mechanism.params)
        self._charge(T, label)
        return probs

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Token-by-token private generation. Each token is one query, charged before release.

        The public row keeps one KV cache; each member keeps its own cache and, when drawn,
        first catches up on the tokens it has not seen. Temperature is applied to the released
        distribution (post-processing, free).
        """
        from pmixed.models.stacked_lora import output_cache

        tok = self.runtime.tokenizer
        ids = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
        seq = list(ids)
        caches: dict[int, tuple[Any, int]] = {}  # row id -> (cache, tokens consumed)
        eos = tok.eos_token_id

        def next_dist(row: int) -> torch.Tensor:
            cache, seen = caches.get(row, (None, 0))
            new = torch.tensor([seq[seen:]], dtype=torch.long, device=self.runtime.device)
            out = self.runtime.stacked(new, [row], past_key_values=cache, use_cache=True)
            caches[row] = (output_cache(out), len(seq))
            return torch.softmax(out.logits[0, -1].double(), dim=-1).cpu()  # [V]: the mechanism on the CPU

        released_ids: list[int] = []
        drawn_log: list[list[int]] = []
        stopped = "length"
        for _ in range(max_new_tokens):
            try:
                self.check_budget(1)
            except BudgetExhausted:
                stopped = "budget"
                break
            drawn = self.mechanism.draw(self.generator)
            public = next_dist(PUBLIC)
            members = (
                torch.stack([next_dist(int(i)) for i in drawn])
                if len(drawn)
                else public.new_zeros(0, public.shape[0])
            )
            dist = self.mechanism.release(public, members)
            try:
                self._charge(1, "generate")
            except BudgetExhausted:
                stopped = "budget"
                break
            if temperature != 1.0:
                dist = torch.softmax(torch.log(dist.clamp(min=1e-300)) / temperature, dim=-1)
            token = sample_token(dist, self.generator)
            drawn_log.append([int(i) for i in drawn])
            seq.append(token)
            released_ids.append(token)
            if stop_at_eos and eos is not None and token == eos:
                stopped = "eos"
                break
        return Generation(
            prompt=prompt,
            text=tok.decode(released_ids, skip_special_tokens=True),
            token_ids=released_ids,
            epsilon_spent=self.ledger.epsilon_spent(),
            stopped=stopped,
            members_drawn=drawn_log,
        )
