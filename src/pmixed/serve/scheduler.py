"""The batched private decode engine behind ``pmixed serve``: continuous batching, one budget.

A background thread advances every active request by one token per step:

1. admit queued requests (up to ``max_active``; beyond ``max_active + max_queue`` a submit is
   refused with :class:`QueueFull`), drop cancelled ones;
2. decide each request's rows. **constant** mode (the default): every request keeps one
   :class:`~pmixed.models.runtime.RowGroup` of N + 1 rows (public model and every member) that
   all consume every token, so a step's work does not depend on the Poisson draw. **drawn**
   mode: the public row plus the members drawn for this token, each with its own cache that
   catches up on the tokens it missed (less work, but the step's time depends on |S|);
3. run the rows: one batched forward for the rows with one pending token, and the rows with
   several (new prompts: prefill; drawn mode: members catching up) in at most three more, split
   by pending count where the padding saved is worth a forward (``catch_up_batches``); in drawn
   mode the public rows run in forwards of their own, so that p_0 does not depend on the draw
   through the batch's rounding (``public_apart``), and each part's one-token rows join its split.
   With ``prefill_tokens`` set (``pmixed serve --prefill-tokens``) prompts are prefilled in
   chunks: at most that many prompt tokens per step, shared by the new requests in admission
   order, so the streams already decoding keep stepping while a long prompt is consumed
   (``_prefill_plan``; the schedule follows prompt lengths and arrivals only);
4. per request: check the public row (an invalid one ends that request with "error", before
   its draw is used and without a charge: it depends on public data only), release the token's
   distribution (eq. (M1); constant mode with the work of all N members, ``release_masked``);
5. pay for each private token before it is sent, from the request's **reservation**: when a
   request is admitted, ``Ledger.reserve`` charges its ``max_tokens`` (or as many as the budget
   affords) in one durable transaction; each token takes one of them without I/O; a request
   that has used its grant tops it up once more (the budget may have been given back by
   others); when it ends, the untaken part is refunded in one transaction. So the ledger sees
   one or two transactions per request, not one per token, and a crash wastes at most the
   reserved but unsent part, never sends an uncharged token. Admission order (not a function of
   private data) decides who gets the budget when it runs short. A request that cannot be paid
   for ends with "budget", or continues from the public model alone when the operator enabled
   ``public_continuation`` (each such token marked ``public_only``);
6. sample (temperature / top-k / top-p on the released distribution: post-processing) from the
   OS CSPRNG, put the tokens on the streams, end requests at end of sequence, ``max_tokens``
   or the context.

Screened PMixED (``AdaptivePMixED``, docs/privacy.md section 11): each request (each choice)
has its own :class:`~pmixed.mechanism.screen.Screen` (OS CSPRNG). The ledger must use the
mechanism's Renyi filter, and the reservation's per-"query" charge is one *unit* (a screen
round and its one private answer): when a request's screen has no open round, one unit is taken
from its reservation (refused: "budget", or public continuation) and only then does the round
open; the screen then decides each token (its score reads the round's test members' rows only
when ``screen_weight`` > 0); a private token is a PMixED release with an independent Poisson
draw (and closes the round), a public one is the public model's distribution. In constant-work
mode all N members run for every token, the test members' scores are computed from all N rows,
a mask is drawn and ``release_masked`` runs for every token (an all-False mask for a public
answer), so a step's work depends neither on the screen's decision nor on the draw. In drawn
mode a public answer runs no member beyond what was speculated: the test members run while the
screen is private, and when the stream's previous answer was private the next round's test
subsample and the next answer's Poisson draw are made before the round is paid and the screen
decides, and their members run in the same step as the public row (the draw is used only for a
private answer; the public rows run in forwards of their own, as in plain drawn mode), so a run
of private answers costs one step's forwards, as plain PMixED's;
timing then reveals the screen's bits (treated as released by the proof) and the draws.

What leaves the engine: tokens, finish reasons, the budget's state, and counters that do not
depend on the draw (drawn mode's ``stats()`` omits the rows it ran). Error messages never name
a member. Memory: a request holds at most N + 1 caches of at most the model's context (constant
mode: exactly that; drawn mode: member caches idle for ``max_idle_steps`` steps are dropped and
rebuilt on the next draw), so cache memory is bounded by ``max_active`` x (N + 1) x context x
the per-token KV size (``cache_bytes_per_request``); constant mode's shared batch reserves spare
rows for requests that join it up to the same ``max_active`` x (N + 1) rows (reserved, not
written: memory is committed only as rows are used).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from pmixed.errors import PMixEDError, PromptTooLong
from pmixed.mechanism.adaptive import AdaptivePMixED
from pmixed.mechanism.pairs import row_totals
from pmixed.mechanism.pmixed import PMixED
from pmixed.mechanism.release import release_masked
from pmixed.mechanism.sampling import sample
from pmixed.mechanism.screen import Screen, chi_square, member_score, public_entropy
from pmixed.mechanism.subsample import poisson_draw, poisson_mask
from pmixed.models.runtime import PUBLIC, EnsembleRuntime, RowGroup
from pmixed.privacy.accountant import RdpCharge
from pmixed.privacy.ledger import Ledger, Reservation
from pmixed.serve.stream import SamplingParams, Stream, Token

__all__ = ["Decoder", "Mode", "QueueFull"]

log = logging.getLogger("pmixed.serve")

Mode = Literal["constant", "drawn"]


class QueueFull(PMixEDError):
    """Admission control refused a request: ``max_active`` running and ``max_queue`` waiting."""

    exit_code = 1

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"the server is at capacity; retry in {retry_after:.0f} s")


@dataclass
class _Request:
    stream: Stream
    params: SamplingParams
    seq: list[int]
    order: int  # admission order: the only thing that decides who is served when budget is short
    groups: dict[int, RowGroup] = field(default_factory=dict)  # key PUBLIC, member i, or ALL
    idle: dict[int, int] = field(default_factory=dict)  # drawn mode: member -> last step used
    generated: int = 0
    public_only: bool = False
    reservation: Reservation | None = None  # the private tokens (adaptive: units) paid for in advance
    screen: Screen | None = None  # adaptive: this stream's screen (never leaves the engine)
    last_private: bool = False  # adaptive, drawn mode: the screen's previous bit (treated as released)
    first_draw: list[int] | None = None  # plain drawn mode: the first token's draw, made when its prefill starts


ALL = -2  # constant mode's one group of N + 1 rows
#: Rows with several pending tokens run in at most this many forwards, each padded to its
#: longest row; a forward's fixed cost, counted in row-positions of padding it is worth saving.
MAX_CATCH_UP_FORWARDS = 3
FORWARD_COST_POSITIONS = 64
#: Chunked prefill (``prefill_tokens``): a prompt's piece in a prefill-only step is at least this
#: long (a one-token piece would join constant mode's one-token batch and make it rebuild).
MIN_PREFILL_CHUNK = 2
#: The default budget of prompt tokens per step (None: whole prompts in the step they arrive). On
#: the tiny shape with 256-token prompts arriving while 8 streams decode, 64 kept the time to
#: first token and the rate and cut the longest inter-token gap 3x (README, Serving speed).
DEFAULT_PREFILL_TOKENS = 64


def catch_up_batches(groups: Sequence[RowGroup], most: int | None = None,
                     overhead: int | None = None) -> list[list[RowGroup]]:
    """Split groups with pending tokens into at most ``most`` batches of contiguous pending
    counts minimising sum(rows x longest pending) + overhead x batches: a batch pads every row
    to its longest, so one batch of a few long catch-ups and many short ones is mostly padding.
    Exact, by dynamic programming over the distinct pending counts. [] for no groups."""
    most = MAX_CATCH_UP_FORWARDS if most is None else most
    overhead = FORWARD_COST_POSITIONS if overhead is None else overhead
    if not groups:
        return []
    by_len: dict[int, list[RowGroup]] = {}
    for g in groups:
        by_len.setdefault(len(g.tokens), []).append(g)
    lens = sorted(by_len)  # distinct pending counts, ascending
    rows = [sum(len(g.adapters) for g in by_len[n]) for n in lens]
    D = len(lens)
    prefix = [0]
    for r in rows:
        prefix.append(prefix[-1] + r)
    # best[b][i]: the cost of the first i counts in b batches; cut[b][i]: where its last batch starts
    inf = float("inf")
    best = [[inf] * (D + 1) for _ in range(most + 1)]
    cut = [[0] * (D + 1) for _ in range(most + 1)]
    best[0][0] = 0.0
    for b in range(1, most + 1):
        for i in range(1, D + 1):
            for j in range(i):  # the last batch holds counts j..i-1, padded to lens[i - 1]
                c = best[b - 1][j] + (prefix[i] - prefix[j]) * lens[i - 1] + overhead
                if c < best[b][i]:
                    best[b][i], cut[b][i] = c, j
    b = min(range(1, most + 1), key=lambda k: best[k][D])
    out, i = [], D
    while b > 0:
        j = cut[b][i]
        out.append([g for n in lens[j:i] for g in by_len[n]])
        i, b = j, b - 1
    return out[::-1]


def public_apart(groups: Sequence[RowGroup]) -> list[list[RowGroup]]:
    """Drawn mode's groups as [public rows, member rows] (empty parts dropped): the forwards that
    compute p_0 then hold public rows only, so their composition (which requests, how many
    pending tokens) is public and p_0 is the same whatever is drawn."""
    public = [g for g in groups if g.adapters == [PUBLIC]]
    members = [g for g in groups if g.adapters != [PUBLIC]]
    if any(PUBLIC in g.adapters for g in members):
        raise ValueError("drawn mode keeps the public row in a group of its own")
    return [part for part in (public, members) if part]


STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class Decoder:
    """Continuous-batching private decoder over one runtime, one mechanism and one ledger."""

    def __init__(
        self,
        runtime: EnsembleRuntime,
        mechanism: PMixED | AdaptivePMixED,
        ledger: Ledger,
        *,
        mode: Mode = "constant",
        max_active: int = 8,
        max_queue: int = 32,
        public_continuation: bool = False,
        max_idle_steps: int = 256,
        unit: str = "part",
        prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS,
        uncovered_sampling: bool = False,
    ):
        """``uncovered_sampling``: accept temperature / top_p / top_k other than the defaults, which
        the privacy guarantee does not cover (``SamplingParams.covered``); for experiments and
        tests only, never for serving."""
        if mode not in ("constant", "drawn"):
            raise ValueError(f"mode must be 'constant' or 'drawn', got {mode!r}")
        if mechanism.ensemble_size != runtime.n_members:
            from pmixed.errors import EnsembleMismatch

            raise EnsembleMismatch(
                f"mechanism calibrated for N={mechanism.ensemble_size} but the ensemble has "
                f"{runtime.n_members} members"
            )
        if max_active < 1 or max_queue < 0:
            raise ValueError("max_active must be >= 1 and max_queue >= 0")
        if prefill_tokens is not None and prefill_tokens < MIN_PREFILL_CHUNK:
            raise ValueError(f"prefill_tokens must be >= {MIN_PREFILL_CHUNK} (or None: whole prompts), got {prefill_tokens}")
        self.runtime = runtime
        self.mechanism = mechanism
        self.ledger = ledger
        self.mode: Mode = mode
        self.max_active = max_active
        self.max_queue = max_queue
        self.public_continuation = public_continuation
        self.max_idle_steps = max_idle_steps
        self.prefill_tokens = prefill_tokens
        self.uncovered_sampling = uncovered_sampling
        self.unit = unit
        self.adaptive = isinstance(mechanism, AdaptivePMixED)
        mechanism.check_rule(ledger)  # adaptive, or a tuned shape: the Renyi filter at its order
        self._unit = mechanism.charge(ledger.orders, label="serve")  # one token (adaptive: one unit)
        self._rdp = self._unit.rdp
        self._release_params = mechanism.release_params if self.adaptive else mechanism.params
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._order = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._step_no = 0
        self._stats = {"steps": 0, "tokens_private": 0, "tokens_public": 0, "requests": 0,
                       "step_seconds_total": 0.0, "last_step_seconds": 0.0, "charges": 0, "rows_total": 0}
        if self.adaptive:  # rounds opened (one unit taken each) and tokens the screen answered from p_0
            self._stats.update({"units": 0, "tokens_screened_public": 0})
        self._step_times: deque[float] = deque(maxlen=1024)
        self._step_hist = dict.fromkeys(STEP_BUCKETS, 0)  # le -> steps (per bucket, not cumulative)

    # ------------------------------------------------------------------ public API

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    @property
    def context_length(self) -> int | None:
        return self.runtime.context_length

    def start(self) -> Decoder:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pmixed-decoder", daemon=True)
            self._thread.start()
        return self

    @torch.no_grad()
    def warm_up(self) -> float:
        """Run once what the first request would otherwise pay for: the forward's kernels and
        the mechanism's fused kernels (numba loads them on first call: about 1 s here, 3 s
        before its on-disk cache exists, all of it in the first request's first token). The
        input is public and fixed: one token (id 0) through the rows of one request, their
        distributions through the mode's release, the screen's statistics and sampling. Nothing
        is drawn, charged, counted or sent; the outputs are discarded. Call it before serving
        (``pmixed serve`` does). Returns the seconds it took."""
        t0 = time.perf_counter()
        n = self.mechanism.ensemble_size
        ids = [PUBLIC, *range(n)]
        if self.mode == "constant":
            (rows,) = self.runtime.decode([RowGroup(ids, tokens=[0])])
        else:
            rows = torch.cat(self.runtime.decode([RowGroup([k], tokens=[0]) for k in ids]))
        rows = rows.double().cpu()  # [N + 1, V], as a step hands them to the mechanism
        public, members = rows[0], rows[1:]
        row_totals(public[None], "public")
        everyone = torch.ones(n, dtype=torch.bool)  # a fixed mask: no draw
        dist = release_masked(public, members, everyone, self._release_params)
        self.mechanism.release(public, members[: max(1, n // 2)])
        if self.adaptive:
            member_score(chi_square(public, members))
            public_entropy(public[None])
        sample(dist)
        sample(dist, temperature=0.7, top_k=2, top_p=0.9)  # the threshold searches' kernels too
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the engine thread; running and queued requests end with "cancelled"."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for req in list(self._active) + list(self._pending):
            self._finish(req, "cancelled")
        self._active.clear()
        self._pending.clear()

    def __enter__(self) -> Decoder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *,
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request. Refusals happen here, before anything is drawn or charged: an empty
        prompt (ValueError), one that leaves no room in the context (PromptTooLong), a full
        server (QueueFull)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self._vocab_size()
        if vocab is not None and any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        ctx = self.context_length
        if ctx is not None and len(ids) > ctx - 1:
            raise PromptTooLong(len(ids), ctx)
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        if not (params.covered or self.uncovered_sampling):
            raise ValueError("temperature, top_p and top_k other than 1, 1 and 0 are not covered by the privacy "
                             "guarantee (they act on each draw's mixture); see docs/privacy.md section 8b")
        stream = Stream(len(ids), loop)
        with self._lock:
            if self._closing:
                raise QueueFull(retry_after=5)
            if len(self._active) + len(self._pending) >= self.max_active + self.max_queue:
                raise QueueFull(retry_after=max(1.0, self._mean_step() * params.max_tokens))
            self._order += 1
            self._pending.append(_Request(stream, params, ids, self._order))
            self._stats["requests"] += 1
            self._wake.notify_all()
        return stream

    def privacy(self) -> dict:
        """The shared budget's state (functions of the charges only). Screened PMixED adds the
        filter's order and rule, and ``queries_left`` counts units (``units_left``)."""
        spent = self.ledger.epsilon_spent()
        left = self.ledger.queries_left(self._rdp)
        out = {
            "mechanism": "adaptive" if self.adaptive else "pmixed",
            "epsilon_spent": spent,
            "epsilon_limit": self.ledger.epsilon,
            "epsilon_left": max(0.0, self.ledger.epsilon - spent),
            "delta": self.ledger.delta,
            "queries_left": left,
            "per_token_rdp_orders": list(self.ledger.orders),
            "acceptance_rule": self.ledger.rule.name,
            "unit": self.unit,
            "mode": self.mode,
            "ensemble_size": self.mechanism.ensemble_size,
            "sample_rate": self.mechanism.sample_rate,
        }
        if self.adaptive:
            m, sc = self.mechanism, self.mechanism.screen_params
            out.update({
                "filter_order": m.order,
                "units_left": left,
                "queries_left_note": "counted in units: a unit is one screen round and its one private answer (a PMixED "
                                       "release), charged before the round opens; the tokens the screen answers "
                                       "from the public model between units cost nothing more",
                "private_queries": m.private_queries,
                "screen": {"threshold": sc.threshold, "weight": sc.weight, "epsilon": sc.svt_epsilon,
                           "rate": sc.test_rate, "private": sc.private},
            })
        return out

    def stats(self) -> dict:
        """Counters for /metrics: steps, tokens, requests, ledger transactions, the step-time
        histogram (seconds) and, in constant-work mode, the rows run (``rows_total``). In drawn
        mode the rows run depend on the draw and are not reported (the step times do too: /metrics
        is for the operator, docs/privacy.md 8b)."""
        with self._lock:
            out = dict(self._stats)
            out["active"] = len(self._active)
            out["queued"] = len(self._pending)
            out["step_duration_seconds"] = {"buckets": dict(self._step_hist), "sum": self._stats["step_seconds_total"]}
            if self.mode != "constant":
                out.pop("rows_total", None)
        out["cache_bytes_per_request"] = self.cache_bytes_per_request()
        return out

    def cache_bytes_per_request(self) -> int | None:
        """Upper bound on one request's KV caches: (N + 1) rows x context x per-token KV bytes
        (spare positions included: a ``GrowingLayer`` never reserves beyond the context)."""
        cfg = getattr(self.runtime.model, "config", None)
        ctx = self.context_length
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        if not all(isinstance(v, int) for v in (ctx, layers, hidden, heads, kv_heads)):
            return None
        per_token = 2 * layers * kv_heads * (hidden // heads) * torch.finfo(self.runtime.dtype).bits // 8
        return (self.mechanism.ensemble_size + 1) * ctx * per_token

    # ------------------------------------------------------------------ engine thread

    def _vocab_size(self) -> int | None:
        cfg = getattr(self.runtime.model, "config", None)
        v = getattr(cfg, "vocab_size", None)
        return v if isinstance(v, int) else None

    def _mean_step(self) -> float:
        return sum(self._step_times) / len(self._step_times) if self._step_times else 0.05

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._pending and not self._active:
                    self._wake.wait()
                if self._closing:
                    return
            t0 = time.perf_counter()
            try:
                self.step()
            except Exception:  # never a member-dependent message to a client
                log.exception("decode step failed; ending the requests it held")
                for req in self._active:
                    self._finish(req, "error", "internal error in the decode engine")
                self._active.clear()
            dt = time.perf_counter() - t0
            self._step_times.append(dt)
            with self._lock:
                self._stats["steps"] += 1
                self._stats["step_seconds_total"] += dt
                self._stats["last_step_seconds"] = dt
                self._step_hist[next(b for b in STEP_BUCKETS if dt <= b)] += 1

    def _finish(self, req: _Request, reason, error: str | None = None) -> None:
        """End a request: refund the untaken part of its reservation (one transaction), then
        close its stream."""
        if req.reservation is not None:
            try:
                req.reservation.close()
            except Exception:  # the refund is lost (budget wasted), never a release
                log.exception("refund of a reservation failed")
            req.reservation = None
        for g in req.groups.values():  # never steps again: its rows in a shared batch are free
            g.release()
        req.stream.finish(reason, error)

    def _pay(self, req: _Request) -> bool:
        """Take one paid-for query for ``req``'s next private token; when its grant is used up,
        reserve what it may still generate (one transaction). False: the budget cannot pay."""
        if req.reservation is not None and req.reservation.take():
            return True
        if req.reservation is not None:
            req.reservation.close()
        req.reservation = self.ledger.reserve(self._query(1), req.params.max_tokens - req.generated)
        if req.reservation.granted:
            with self._lock:
                self._stats["charges"] += 1
        return req.reservation.take()

    def _query(self, count: int) -> RdpCharge:
        return dataclasses.replace(self._unit, count=count)

    @torch.no_grad()
    def step(self) -> None:
        """One decode step over every active request (see the module docstring)."""
        with self._lock:
            while self._pending and len(self._active) < self.max_active:
                self._active.append(self._pending.popleft())
            active = list(self._active)
        for req in active:
            if req.stream.cancelled:
                self._finish(req, "cancelled")
            elif req.reservation is None and not req.public_only and req.generated == 0:
                # admission: pay for max_tokens in advance (or what the budget affords)
                req.reservation = self.ledger.reserve(self._query(1), req.params.max_tokens)
                if req.reservation.granted:
                    with self._lock:
                        self._stats["charges"] += 1
                elif not self.public_continuation:
                    self._finish(req, "budget")  # nothing to run: no forward for it
                else:
                    req.public_only = True
        active = [r for r in active if not r.stream.done]
        if not active:
            with self._lock:
                self._active = [r for r in self._active if not r.stream.done]
            return
        self._step_no += 1
        running = active
        active, prefill = self._prefill_plan(active)
        if self.adaptive:
            self._step_adaptive(active, prefill, running)
            return
        plan: list[tuple[_Request, list[int], torch.Tensor | None]] = []  # (req, group keys, mask)
        for req in active:
            if self.mode == "constant":
                self._all_group(req)
                mask = None if req.public_only else self.mechanism.draw_mask()
                plan.append((req, [ALL], mask))
            else:
                if req.public_only:
                    drawn = []
                elif req.first_draw is not None:  # drawn when its prefill started (the same law)
                    drawn, req.first_draw = req.first_draw, None
                else:
                    drawn = [int(i) for i in self.mechanism.draw()]
                keys = [PUBLIC, *drawn]
                for k in keys:
                    self._member_group(req, k)
                plan.append((req, keys, None))
        groups = [req.groups[k] for req, keys, _ in plan for k in keys]
        # constant: the same groups step together, so the batch cache is reused
        out = self._forward(groups + prefill, persistent=self.mode == "constant")
        ready: list[tuple[_Request, torch.Tensor, torch.Tensor]] = []  # (req, released, public)
        for req, keys, mask in plan:
            if self.mode == "constant":
                rows = out[id(req.groups[ALL])]  # [N + 1, V]
                public, members = rows[0], rows[1:]
            else:
                public = out[id(req.groups[PUBLIC])][0]
                members = (torch.cat([out[id(req.groups[k])] for k in keys[1:]])
                           if len(keys) > 1 else public.new_zeros(0, public.shape[0]))
            try:
                row_totals(public[None], "public")
            except ValueError:  # public data only: refuse this request, uncharged
                self._finish(req, "error", "the public model's distribution is not valid for this prompt")
                continue
            if req.public_only:
                ready.append((req, public, public))
            elif self.mode == "constant":
                ready.append((req, release_masked(public, members, mask, self.mechanism.params), public))
            else:
                ready.append((req, self.mechanism.release(public, members), public))
        paid: list[tuple[_Request, torch.Tensor, bool]] = []
        for req, dist, public in sorted(ready, key=lambda r: r[0].order):  # admission order
            if not req.public_only and not self._pay(req):  # paid before it is sent
                if not self.public_continuation:
                    self._finish(req, "budget")
                    continue
                req.public_only, dist = True, public
            paid.append((req, dist, False))
        self._emit(paid)
        self._end_step(running)

    def _lead(self, req: _Request) -> int:
        """How many of ``req``'s tokens its rows have consumed (the group that always runs)."""
        g = req.groups.get(ALL if self.mode == "constant" else PUBLIC)
        return 0 if g is None else g.seen

    def _prefill_plan(self, active: list[_Request]) -> tuple[list[_Request], list[RowGroup]]:
        """Chunked prefill: at most ``prefill_tokens`` prompt tokens are consumed in one step, by
        the requests in admission order, so a long prompt that arrives does not stall the streams
        already decoding (they step every step). A request whose whole remaining prompt fits
        takes part in the step and gets its first token; one that does not fit consumes the
        budget left (at least ``MIN_PREFILL_CHUNK`` tokens) in a prefill-only group (its rows
        with a chunk of the prompt: constant mode all N + 1; drawn mode the public row and the
        members of its first token's draw, drawn now; screened drawn mode the public row) and
        gets no token; the rest wait for a later step. Returns (the requests that release a
        token this step, the prefill-only groups). What decides the schedule (prompt lengths,
        admission order, the budget) is public; it does not depend on the draw."""
        budget = self.prefill_tokens
        if budget is None:
            return active, []
        run: list[_Request] = []
        chunks: list[RowGroup] = []
        for req in sorted(active, key=lambda r: r.order):
            if req.generated > 0:  # decoding: one token, every step
                run.append(req)
                continue
            rest = len(req.seq) - self._lead(req)
            if rest <= budget:
                run.append(req)
                budget -= rest
            elif budget >= MIN_PREFILL_CHUNK:
                chunks += self._prefill_groups(req, self._lead(req) + budget)
                budget = 0
        return run, chunks

    def _prefill_groups(self, req: _Request, upto: int) -> list[RowGroup]:
        """``req``'s prefill-only groups, given the prompt's tokens before position ``upto``."""
        if self.mode == "constant":
            keys = [ALL]
            req.groups.setdefault(ALL, RowGroup([PUBLIC, *range(self.mechanism.ensemble_size)]))
        else:
            if not self.adaptive and not req.public_only and req.first_draw is None:
                req.first_draw = [int(i) for i in self.mechanism.draw()]
            keys = [PUBLIC, *(req.first_draw or [])]
            for k in keys:
                req.groups.setdefault(k, RowGroup([k]))
                req.idle[k] = self._step_no
        out = []
        for k in keys:
            g = req.groups[k]
            g.tokens = req.seq[g.seen:upto]
            out.append(g)
        return out

    # ------------------------------------------------------------------ screened PMixED

    def _forward(self, groups: list[RowGroup], persistent: bool) -> dict[int, torch.Tensor]:
        """Batched forwards -> id(group) -> [b, V] float64 on the CPU: one for the rows with one
        pending token, and the rows with several (prefill, drawn mode's catch-up) in at most
        ``MAX_CATCH_UP_FORWARDS`` more, grouped by pending count (``catch_up_batches``); in drawn
        mode, whose rows change every step, the one-token rows join that split too.

        Drawn mode runs the public rows in forwards of their own (``public_apart``): a batched
        forward may round a row differently with the batch's size and padding, and which member
        rows share a step depends on the draw, while p_0 is the proof's common anchor across draws
        (docs/privacy.md section 7); a member row may vary with the draw (Lemma 1 and (B2) hold
        for each draw's own pbar_i)."""
        with self._lock:
            self._stats["rows_total"] += sum(len(g.adapters) for g in groups)
        if self.mode == "drawn":  # rows change every step: any contiguous split of each part
            batches = [b for part in public_apart(groups)
                       for b in catch_up_batches(part, MAX_CATCH_UP_FORWARDS + 1)]
        else:  # the one-token rows keep one batch, which constant mode's next step reuses (with
            # the requests that ended left out and those whose prefill ran added: ``_Batch.adopt``)
            single = [g for g in groups if len(g.tokens) == 1]
            batches = [*catch_up_batches([g for g in groups if len(g.tokens) > 1]), single]
        out: dict[int, torch.Tensor] = {}
        most = self.max_active * (self.mechanism.ensemble_size + 1)  # rows a batch may reserve
        for batch in batches:
            if batch:
                for g, probs in zip(batch, self.runtime.decode(batch, persistent=persistent, max_rows=most)):
                    out[id(g)] = probs.double().cpu()
        return out

    def _all_group(self, req: _Request) -> RowGroup:
        """Constant-work mode: ``req``'s one group of the public row and every member, given the
        tokens it has not seen (one, after the prefill)."""
        g = req.groups.setdefault(ALL, RowGroup([PUBLIC, *range(self.mechanism.ensemble_size)]))
        g.tokens = req.seq[g.seen:]
        return g

    def _member_group(self, req: _Request, k: int) -> RowGroup:
        """Drawn mode: member (or public) row ``k``'s group, caught up on the tokens it missed."""
        g = req.groups.setdefault(k, RowGroup([k]))
        g.tokens = req.seq[g.seen:]
        req.idle[k] = self._step_no
        return g

    def _round_paid(self, req: _Request) -> bool:
        """True when ``req``'s screen has an open round: when it has none, one unit is taken from
        the reservation first (``_pay``) and only then does the round open. False: the budget
        cannot pay; the request has ended with "budget" or (public continuation) is public only."""
        if req.public_only:
            return False
        if req.screen.is_open:
            return True
        if self._pay(req):  # the unit is paid before the round opens
            req.screen.open_round()
            with self._lock:
                self._stats["units"] += 1
            return True
        if not self.public_continuation:
            self._finish(req, "budget")
        else:
            req.public_only = True
        return False

    def _scores(self, req: _Request, public: torch.Tensor, a2: torch.Tensor | None) -> torch.Tensor | None:
        """The round's test members' scores g_i (None for a public screen); ``a2``: [|S_r|] chi-square
        moments of the test members against ``public``."""
        if not self.mechanism.screen_params.private:
            return None
        if a2 is None or a2.numel() == 0:
            return torch.zeros(0, dtype=torch.float64)
        return member_score(a2)

    def _decide(self, req: _Request, public: torch.Tensor, scores: torch.Tensor | None,
                every: torch.Tensor | None = None) -> bool:
        """The screen's bit from S_r's scores, or from every member's (``every`` [N], constant work)."""
        h = float(public_entropy(public[None])[0])
        return req.screen.decide(h, scores, every_score=every)

    def _step_adaptive(self, active: list[_Request], prefill: list[RowGroup], running: list[_Request]) -> None:
        """One decode step of screened PMixED over the requests that release a token this step
        (``prefill``: the chunks of the prompts still being prefilled, run in the first forward;
        ``running``: every admitted request)."""
        m: AdaptivePMixED = self.mechanism
        N, q = m.ensemble_size, m.sample_rate
        private_screen = m.screen_params.private
        for req in active:
            if req.screen is None:
                req.screen = m.new_screen()  # CSPRNG
        ready: list[tuple[_Request, torch.Tensor, bool]] = []  # (req, distribution, screened public)
        order = sorted(active, key=lambda r: r.order)  # admission order decides who is paid
        if self.mode == "constant":
            out = self._forward([self._all_group(req) for req in active] + prefill, persistent=True)
            no_draw = torch.zeros(N, dtype=torch.bool)
            for req in order:
                rows = out[id(req.groups[ALL])]  # [N + 1, V]
                public, members = rows[0], rows[1:]
                try:
                    row_totals(public[None], "public")
                except ValueError:  # public data only: refuse this request before any unit is taken
                    self._finish(req, "error", "the public model's distribution is not valid for this prompt")
                    continue
                if not self._round_paid(req):
                    if not req.stream.done:  # public continuation: the public model alone, marked
                        ready.append((req, public, False))
                    continue
                # the same work whatever the screen decides and whatever is drawn: every member's
                # chi-square and score (those outside the round's test subsample weighted 0), a
                # fresh mask, one release_masked over all N rows
                mask = poisson_mask(N, q)  # the private answer's own draw, independent of the screen's
                every = member_score(chi_square(public, members)) if private_screen else None  # [N]
                private = self._decide(req, public, None, every)
                dist = release_masked(public, members, mask if private else no_draw, self._release_params)
                ready.append((req, dist, not private))
        else:
            # phase 1: the public rows, and the open rounds' test members when the score is private.
            # A request whose screen's previous bit was private also gets the next round's test
            # subsample (private score) and its answer's Poisson draw now (independent of the
            # screen, which has not decided yet) and those members in the same step (``_forward``
            # runs the public rows apart), the draw used only if the screen says private again: a
            # stream of private answers then costs one step's forwards, as plain PMixED's, and a
            # stream of public ones only its public row. The work depends on the previous bit, which
            # the proof treats as released (docs/privacy.md section 11), and on the draw, as in
            # plain drawn-only mode.
            need: list[tuple[_Request, list[int]]] = []
            drawn_for: dict[int, list[int]] = {}  # req order -> the Poisson draw of its answer
            for req in active:
                keys = [PUBLIC]
                if not req.public_only:
                    if private_screen and req.screen.is_open:
                        keys += [int(i) for i in req.screen.test_members]
                    elif private_screen and req.last_private:  # the round to open: its S_r drawn ahead
                        keys += [int(i) for i in req.screen.next_test_members()]
                    if req.last_private:
                        drawn_for[req.order] = [int(i) for i in poisson_draw(N, q)]
                        keys += [k for k in drawn_for[req.order] if k not in keys]
                need.append((req, keys))
            out = self._forward([self._member_group(r, k) for r, keys in need for k in keys] + prefill,
                                persistent=False)
            now: dict[int, dict[int, torch.Tensor]] = {  # req order -> row -> [V] (rows run this step)
                r.order: {k: out[id(r.groups[k])][0] for k in keys} for r, keys in need}
            opened: list[_Request] = []
            for req in order:
                public = now[req.order][PUBLIC]
                try:
                    row_totals(public[None], "public")
                except ValueError:
                    self._finish(req, "error", "the public model's distribution is not valid for this prompt")
                    continue
                if not self._round_paid(req):
                    if not req.stream.done:
                        ready.append((req, public, False))
                    continue
                opened.append(req)

            def run_members(wanted: list[tuple[_Request, list[int]]]) -> None:
                missing = [(r, k) for r, ks in wanted for k in ks if k not in now[r.order]]
                got = self._forward([self._member_group(r, k) for r, k in missing], persistent=False)
                for r, k in missing:
                    now[r.order][k] = got[id(r.groups[k])][0]

            if private_screen:  # phase 2: test members of rounds opened in this step, not run ahead
                run_members([(r, [int(i) for i in r.screen.test_members]) for r in opened])
            decided: list[tuple[_Request, list[int] | None]] = []  # (req, drawn members or None: public)
            for req in opened:
                public, rows = now[req.order][PUBLIC], now[req.order]
                a2 = None
                ids = [int(i) for i in req.screen.test_members] if private_screen else []
                if ids:
                    a2 = chi_square(public, torch.stack([rows[k] for k in ids]))
                private = self._decide(req, public, self._scores(req, public, a2))
                req.last_private = private
                draw = drawn_for.get(req.order)
                if private and draw is None:
                    draw = [int(i) for i in poisson_draw(N, q)]
                decided.append((req, draw if private else None))
            run_members([(r, d) for r, d in decided if d])  # phase 3: drawn members not run in phase 1
            for req, drawn in decided:
                public = now[req.order][PUBLIC]
                members = (torch.stack([now[req.order][k] for k in drawn]) if drawn
                           else public.new_zeros((0, public.shape[-1])))
                ready.append((req, m.release(public, members), drawn is None))
        self._emit(ready)
        self._end_step(running)

    def _end_step(self, active: list[_Request]) -> None:
        """After a step: in drawn mode drop member caches idle for long (the memory bound); forget
        the requests that ended."""
        if self.mode == "drawn":
            for req in active:
                for k, last in list(req.idle.items()):
                    if k != PUBLIC and self._step_no - last > self.max_idle_steps:
                        req.groups.pop(k, None)
                        req.idle.pop(k, None)
        with self._lock:
            self._active = [r for r in self._active if not r.stream.done]

    def _emit(self, ready: list[tuple[_Request, torch.Tensor, bool]]) -> None:
        """Sample and send one token per request, each already paid for (a token, or its round's
        unit); ``ready`` holds (request, released distribution, answered by the screen from p_0)."""
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        ctx = self.context_length
        for req, dist, screened in sorted(ready, key=lambda r: r[0].order):
            if req.stream.done:
                continue
            p = req.params
            token = sample(dist, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
            req.seq.append(token)
            req.generated += 1
            req.stream.put(Token(token, public_only=req.public_only))
            with self._lock:
                self._stats["tokens_public" if req.public_only else "tokens_private"] += 1
                if screened and not req.public_only:
                    self._stats["tokens_screened_public"] += 1
            if p.stop_at_eos and eos is not None and token == eos:
                self._finish(req, "stop")
            elif req.generated >= p.max_tokens or (ctx is not None and len(req.seq) >= ctx):
                self._finish(req, "length")
