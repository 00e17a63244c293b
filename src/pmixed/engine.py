"""The private prediction engine: check budget -> forward -> mechanism -> charge durably -> release.

:class:`PrivatePredictor` answers next-token queries with PMixED on an
:class:`pmixed.models.runtime.EnsembleRuntime` (one base model, N stacked LoRA members) and
charges every query to a durable :class:`pmixed.privacy.ledger.Ledger` before its answer leaves
the object. Token-by-token generation keeps one KV cache per row (the public model and each
member); a member drawn again catches up lazily on the tokens it missed.

What leaves the object is the released tokens, the budget's state and why generation stopped —
never the drawn set S (the amplification by subsampling in docs/privacy.md (R1)-(R2) needs S
hidden), and never an error that depends on a member: an invalid member row gets lam = 0
(pmixed.mechanism.pairs); only an invalid *public* row refuses, before anything is drawn.

With :class:`pmixed.mechanism.adaptive.AdaptivePMixED` (screened PMixED, docs/privacy.md
section 11) the ledger must use the mechanism's Renyi filter (``Ledger(..., rule=mech.rule)``).
Each generation has its own screen; a *unit* (one screen round and its one private answer) is
charged durably before its round opens, tokens the screen sends to the public model cost
nothing more, and ``queries_left`` counts units.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from pmixed.errors import (
    BudgetExhausted,
    EnsembleMismatch,
    GenerationInterrupted,
    PromptTooLong,
)
from pmixed.mechanism.adaptive import AdaptivePMixED
from pmixed.mechanism.pairs import row_totals
from pmixed.mechanism.pmixed import PMixED
from pmixed.mechanism.sampling import postprocess
from pmixed.mechanism.subsample import sample_token
from pmixed.models.runtime import PUBLIC, EnsembleRuntime, RowGroup
from pmixed.privacy.accountant import RdpCharge
from pmixed.privacy.ledger import Ledger

__all__ = ["Generation", "PrivatePredictor", "ScreenedGeneration", "StopReason"]

StopReason = Literal["length", "eos", "budget"]


@dataclass
class Generation:
    """What a caller may see of one private generation (all of it covered by the guarantee:
    the tokens are the mechanism's outputs; the budget figures are functions of the charges)."""

    prompt: str
    text: str
    token_ids: list[int]
    epsilon_spent: float  # the ledger's total after the last charge
    stopped: StopReason  # max_new_tokens or the model's context / end of sequence / budget
    epsilon_limit: float = float("nan")
    queries_left: int = 0  # further tokens (adaptive: units) the ledger affords at this mechanism's cost
    prompt_tokens: int = 0  # after any left truncation


@dataclass
class ScreenedGeneration(Generation):
    """A screened-PMixED generation (``AdaptivePMixED``): ``queries_left`` counts units, and the
    extra figures are functions of the screen's decisions (outputs of the AboveThreshold screen,
    covered by the units charged) and of the configuration; none depends on a Poisson draw."""

    charged: int = 0  # units this generation charged: one per screen round opened
    private_answers: int = 0  # tokens released by PMixED; the others are the screen's public answers
    filter_order: int = 0  # the Renyi filter's order (fixed by the configuration)
    mechanism: str = "adaptive"


class PrivatePredictor:
    """Answers queries with PMixED, charging each one to the ledger before it is released
    (or with screened PMixED, charging each unit before its screen round opens)."""

    def __init__(
        self,
        runtime: EnsembleRuntime,
        mechanism: PMixED | AdaptivePMixED,
        ledger: Ledger,
        *,
        generator: torch.Generator | None = None,
    ):
        if mechanism.ensemble_size != runtime.n_members:
            raise EnsembleMismatch(
                f"mechanism calibrated for N={mechanism.ensemble_size} but the ensemble has "
                f"{runtime.n_members} members"
            )
        self.runtime = runtime
        self.mechanism = mechanism
        self.ledger = ledger
        self.generator = generator  # None: CSPRNG (serving); a seeded one for experiments
        self.adaptive = isinstance(mechanism, AdaptivePMixED)
        mechanism.check_rule(ledger)  # adaptive, or a tuned shape: the Renyi filter at its order
        self._unit = mechanism.charge(ledger.orders)  # one query (adaptive: one unit), computed once
        self._rdp = self._unit.rdp

    def _query_charge(self, count: int, label: str) -> RdpCharge:
        return dataclasses.replace(self._unit, count=count, label=label)

    def charge(self, count: int, label: str) -> None:
        """Durably record ``count`` queries (adaptive: units); raises BudgetExhausted (nothing recorded) if over."""
        self.ledger.charge(self._query_charge(count, label))

    def check_budget(self, count: int) -> None:
        """Raise BudgetExhausted unless ``count`` more queries fit (read-only: a later charge may
        still be refused when another process spends in between)."""
        charge = self._query_charge(count, "check")
        if not self.ledger.can_afford(charge):
            raise BudgetExhausted(self.ledger.epsilon_spent(), self.ledger.epsilon_if(charge), self.ledger.epsilon)

    def queries_left(self) -> int:
        """Further queries the ledger affords at this mechanism's per-query cost (adaptive: further
        units under the filter; tokens the screen answers from the public model cost nothing)."""
        return self.ledger.queries_left(self._rdp)

    def prompt_ids(self, prompt: str, *, truncate: bool = False) -> list[int]:
        """The prompt's token ids, checked against the model's context before anything is drawn
        or charged: at most context - 1 tokens (room for one new token), else PromptTooLong, or
        with ``truncate`` the last context - 1 tokens."""
        tok = self.runtime.tokenizer
        ids = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
        ctx = self.runtime.context_length
        if ctx is not None and len(ids) > ctx - 1:
            if not truncate:
                raise PromptTooLong(len(ids), ctx)
            ids = ids[len(ids) - (ctx - 1):]
        return list(ids)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        stop_at_eos: bool = True,
        truncate_prompt: bool = False,
    ) -> Generation:
        """Token-by-token private generation. Each token is one query, charged before release.

        Per token: budget check (read-only) -> the public row's next-token distribution (an
        invalid one refuses here, before the draw: it depends on public data and released tokens
        only) -> Poisson draw -> the drawn members' distributions (each row's cache catches up on
        the tokens it has not seen) -> release (eq. (M1)) -> durable charge -> temperature
        (post-processing of the released distribution, free) -> sample. Generation stops at
        ``max_new_tokens`` or the model's context ("length"), end of sequence ("eos"), or when
        the budget cannot pay for one more token ("budget"). An error after a token was released
        raises GenerationInterrupted carrying the released tokens.

        Screened PMixED (``AdaptivePMixED``): the public row first (an invalid one refuses,
        uncharged); when the generation's screen has no open round, one unit is charged durably
        (refused: "budget") and the round opens; then ``AdaptivePMixED.answer``: the screen decides
        (reading only its test members' rows when its score is private), a private token is a
        PMixED release with an independent Poisson draw (and closes the round), a public one is
        p_0 alone and runs no member.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        if temperature != 1.0 and self.generator is None:  # serving mode: only the release as it is
            raise ValueError(f"temperature {temperature:g} is not covered by the privacy guarantee (it would act "
                             "on each draw's mixture); use 1, or a seeded experiment")
        tok = self.runtime.tokenizer
        seq = self.prompt_ids(prompt, truncate=truncate_prompt)  # PromptTooLong before any charge
        n_prompt = len(seq)
        ctx = self.runtime.context_length
        rows: dict[int, RowGroup] = {}  # row id -> its cache and how much of seq it has consumed
        eos = tok.eos_token_id
        released: list[int] = []
        stopped: StopReason = "length"
        adaptive = self.adaptive
        screen = self.mechanism.new_screen(self.generator) if adaptive else None  # this stream's
        counts = {"charged": 0, "private": 0}

        def dists(row_ids: list[int]) -> torch.Tensor:  # [len(row_ids), V] float64 on the CPU
            batch = []
            for r in row_ids:
                row = rows.setdefault(r, RowGroup([r]))
                row.tokens = seq[row.seen:]
                batch.append(row)
            return torch.cat(self.runtime.decode(batch)).double().cpu()

        def result() -> Generation:
            extra = ({"charged": counts["charged"], "private_answers": counts["private"],
                      "filter_order": self.mechanism.order} if adaptive else {})
            return (ScreenedGeneration if adaptive else Generation)(
                prompt=prompt,
                text=tok.decode(released, skip_special_tokens=True),
                token_ids=list(released),
                epsilon_spent=self.ledger.epsilon_spent(),
                stopped=stopped,
                epsilon_limit=self.ledger.epsilon,
                queries_left=self.queries_left(),
                prompt_tokens=n_prompt,
                **extra,
            )

        def member_probs(ids: torch.Tensor) -> torch.Tensor:  # adaptive: only the named members run
            return dists([int(i) for i in ids])

        try:
            for _ in range(max_new_tokens):
                if ctx is not None and len(seq) >= ctx:
                    break  # "length": the next token would have no position
                if adaptive:
                    if not screen.is_open and not self.ledger.can_afford(self._query_charge(1, "check")):
                        stopped = "budget"  # read-only check: no forward for a unit that cannot be paid
                        break
                    public = dists([PUBLIC])[0]  # [V]
                    row_totals(public[None], "public")  # an invalid public row refuses before any charge
                    try:  # charges the unit (durably) before the round opens, then screens
                        ans = self.mechanism.answer(self.ledger, screen, public, member_probs,
                                                    generator=self.generator, label="generate")
                    except BudgetExhausted:  # another process spent in between: nothing released
                        stopped = "budget"
                        break
                    dist = ans.dist  # [V] float64: the release, or p_0 renormalised
                    counts["charged"] += int(ans.charged)
                    counts["private"] += int(ans.private)
                else:
                    try:
                        self.check_budget(1)
                    except BudgetExhausted:
                        stopped = "budget"
                        break
                    public = dists([PUBLIC])[0]  # [V]
                    row_totals(public[None], "public")  # an invalid public row refuses before the draw
                    drawn = self.mechanism.draw(self.generator)  # [m]; never leaves this method
                    members = dists([int(i) for i in drawn]) if len(drawn) else public.new_zeros(0, public.shape[0])
                    dist = self.mechanism.release(public, members)  # [V] float64
                    try:
                        self.charge(1, "generate")
                    except BudgetExhausted:  # another process spent in between: nothing released
                        stopped = "budget"
                        break
                token = self._sample(dist, temperature)
                seq.append(token)
                released.append(token)
                if stop_at_eos and eos is not None and token == eos:
                    stopped = "eos"
                    break
        except Exception as err:
            if released:
                raise GenerationInterrupted(result(), err) from err
            raise
        return result()

    def _sample(self, dist: torch.Tensor, temperature: float) -> int:
        """Temperature (1 outside experiments: any other is not covered by the guarantee), then
        one token, in constant time (``mechanism.sampling``)."""
        return sample_token(postprocess(dist, temperature=temperature), self.generator)
