"""The batched decode engine: batched steps equal full recomputation, the budget is never
exceeded and every token sent was charged first, constant-work mode's work does not depend on
the draw, and refusals happen before anything is charged."""

from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from pmixed.errors import PromptTooLong  # noqa: E402
from pmixed.mechanism.pmixed import PMixED  # noqa: E402
from pmixed.models.runtime import PUBLIC, EnsembleRuntime, RowGroup  # noqa: E402
from pmixed.privacy.ledger import Ledger, record_count  # noqa: E402
from pmixed.serve import scheduler as scheduler_mod  # noqa: E402
from pmixed.serve.scheduler import ALL, Decoder, QueueFull, catch_up_batches  # noqa: E402
from pmixed.serve.stream import SamplingParams  # noqa: E402
from tests.models.test_stacked_lora import ARCHS, VOCAB, save_adapters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

N = 3


@pytest.fixture(scope="module", params=list(ARCHS))
def runtime(request, tmp_path_factory):
    make, targets, fifo = ARCHS[request.param]
    base = make()
    dirs = save_adapters(base, targets, fifo, tmp_path_factory.mktemp(request.param), n=N)
    return EnsembleRuntime(base, None, dirs)  # context 64 (the tiny configs' positions)


def mech(q=1.0, queries=64, epsilon=8.0):
    return PMixED(epsilon=epsilon, delta=1e-5, query_budget=queries, ensemble_size=N, sample_rate=q,
                  lam_max=0.9)


def greedy_reference(rt, m, prompt, n):
    """Full recomputation of every prefix, all members drawn (q = 1), greedy (top_k = 1)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        ids = torch.tensor([seq])
        pub = rt.probs(ids, [PUBLIC])[0, -1].double()
        mem = torch.stack([rt.probs(ids, [i])[0, -1].double() for i in range(N)])
        tok = int(torch.argmax(m.release(pub, mem)))
        seq.append(tok)
        out.append(tok)
    return out


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_concurrent_batched_requests_equal_full_recomputation(runtime, mode, prefill_tokens=None,
                                                              prompts=([1, 2, 3], [5, 6, 7, 8, 9, 10], [11], [4, 4, 4, 4])):
    m = mech(q=1.0)
    want = [greedy_reference(runtime, m, p, 6 + i) for i, p in enumerate(prompts)]
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, \
            Decoder(runtime, m, led, mode=mode, prefill_tokens=prefill_tokens, uncovered_sampling=True) as dec:
        streams = [dec.submit(p, SamplingParams(max_tokens=6 + i, top_k=1, stop_at_eos=False))
                   for i, p in enumerate(prompts)]
        got = [[t.id for t in s] for s in streams]
        assert got == want
        assert all(s.finish_reason == "length" for s in streams)
        assert sum(record_count(r) for r in led.history()) == sum(len(g) for g in got)


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_shared_budget_is_never_exceeded_and_every_sent_token_was_charged(runtime, mode):
    m = mech(q=0.5, queries=40)
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        with Decoder(runtime, m, led, mode=mode, max_active=8, max_queue=32) as dec:
            streams = [dec.submit([1 + i % 7, 2], SamplingParams(max_tokens=5, stop_at_eos=False))
                       for i in range(32)]

            sent = [0] * len(streams)

            def read(i, s):
                sent[i] = sum(1 for _ in s)

            threads = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        charged = sum(record_count(r) for r in led.history())
        assert charged == sum(sent) <= 40  # T = 40 queries fit, not one more
        assert led.epsilon_spent() <= 8.0
        assert led.queries_left(m.query_rdp(led.orders)) == 0
    reasons = [s.finish_reason for s in streams]
    assert set(reasons) <= {"length", "budget"} and "budget" in reasons
    for s, n in zip(streams, sent):
        assert (s.finish_reason == "length") == (n == 5)


def _rows_per_forward(runtime, monkeypatch):
    sizes = []
    real = type(runtime).decode

    def spy(self, groups, **kw):
        sizes.append(sum(len(g.adapters) for g in groups))
        return real(self, groups, **kw)

    monkeypatch.setattr(type(runtime), "decode", spy)
    return sizes


@pytest.mark.parametrize("mode, same", [("constant", True), ("drawn", False)])
@pytest.mark.parametrize("prefill_tokens", [None, 2])
def test_constant_work_mode_does_not_depend_on_the_draw(runtime, monkeypatch, mode, same, prefill_tokens):
    """The rows run per step are the same whether every member or none is drawn in constant
    mode; in drawn mode they are not (what the mode's timing assumption is about). Also with
    chunked prefill (a budget of 2 prompt tokens per step)."""
    m = mech(q=0.5)
    runs = []
    for drawn in (True, False):
        with monkeypatch.context() as mp:
            sizes = _rows_per_forward(runtime, mp)
            mp.setattr("pmixed.mechanism.pmixed.poisson_mask",
                       lambda n, q, positions=None, g=None, d=drawn: torch.full((n,), d))
            with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, \
                    Decoder(runtime, m, led, mode=mode, prefill_tokens=prefill_tokens) as dec:
                s = dec.submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=4, stop_at_eos=False))
                assert len(list(s)) == 4
            runs.append(list(sizes))
    assert (runs[0] == runs[1]) is same


def _public_forwards(runtime, monkeypatch, m, drawn: bool) -> list[tuple]:
    """Drawn mode, every member or none drawn at every step: the forwards that held a public row,
    each as its groups' (rows, pending tokens, cached tokens)."""
    seen = []
    real = type(runtime).decode

    def spy(self, groups, **kw):
        if any(PUBLIC in g.adapters for g in groups):
            seen.append(tuple((tuple(g.adapters), len(g.tokens), g.seen) for g in groups))
        return real(self, groups, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(type(runtime), "decode", spy)
        mp.setattr(m, "draw", lambda generator=None: torch.arange(N) if drawn else torch.zeros(0, dtype=torch.long))
        with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, Decoder(runtime, m, led, mode="drawn") as dec:
            streams = [dec.submit(p, SamplingParams(max_tokens=5, stop_at_eos=False)) for p in ([1, 2, 3], [4, 5])]
            assert [len(list(s)) for s in streams] == [5, 5]
    return seen


def test_drawn_mode_computes_the_public_rows_apart_from_the_draw(runtime, monkeypatch):
    """p_0 is the proof's common anchor across draws (docs/privacy.md section 7): in drawn mode the
    forwards that compute it hold public rows only, the same forwards whatever is drawn. The
    unsound variant (public rows batched with the drawn members, as before) is caught."""
    m = mech(q=0.5)
    every, none = (_public_forwards(runtime, monkeypatch, m, d) for d in (True, False))
    assert every == none and len(every) >= 5
    assert all(rows == (PUBLIC,) for fwd in every for rows, _, _ in fwd)
    monkeypatch.setattr(scheduler_mod, "public_apart", lambda groups: [list(groups)])  # the unsound variant
    every, none = (_public_forwards(runtime, monkeypatch, m, d) for d in (True, False))
    assert every != none


def test_public_apart_keeps_public_rows_alone():
    pub, mem = RowGroup([PUBLIC], [1]), RowGroup([2], [1, 2])
    assert scheduler_mod.public_apart([mem, pub]) == [[pub], [mem]]
    assert scheduler_mod.public_apart([mem]) == [[mem]] and scheduler_mod.public_apart([]) == []
    with pytest.raises(ValueError, match="group of its own"):
        scheduler_mod.public_apart([RowGroup([PUBLIC, 0], [1])])


def test_refusals_come_before_any_charge(runtime):
    m = mech()
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        dec = Decoder(runtime, m, led, max_active=1, max_queue=1)  # not started: nothing runs
        with pytest.raises(PromptTooLong):
            dec.submit(list(range(1, 64)) + [1], SamplingParams())
        with pytest.raises(ValueError, match="empty"):
            dec.submit([], SamplingParams())
        with pytest.raises(ValueError, match="token ids"):
            dec.submit([VOCAB + 5], SamplingParams())
        dec.submit([1], SamplingParams())
        dec.submit([1], SamplingParams())
        with pytest.raises(QueueFull):
            dec.submit([1], SamplingParams())
        dec.close()
        assert led.charges() == 0


def test_an_invalid_public_row_ends_the_request_uncharged(runtime, monkeypatch):
    m = mech()
    real = type(runtime).decode

    def broken(self, groups, **kw):
        out = real(self, groups, **kw)
        return [torch.full_like(o, float("nan")) if g.adapters[0] == PUBLIC else o for g, o in zip(groups, out)]

    monkeypatch.setattr(type(runtime), "decode", broken)
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, Decoder(runtime, m, led) as dec:
        s = dec.submit([1, 2], SamplingParams(max_tokens=3))
        assert list(s) == [] and s.finish_reason == "error" and "public" in s.error
        # the admission's reservation was refunded whole: nothing spent
        assert sum(record_count(r) for r in led.history()) == 0 and led.epsilon_spent() == 0


def test_cancel_and_public_continuation(runtime):
    m = mech(q=0.5, queries=3)
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        with Decoder(runtime, m, led, public_continuation=True) as dec:
            s = dec.submit([1, 2], SamplingParams(max_tokens=6, stop_at_eos=False))
            toks = list(s)
        assert [t.public_only for t in toks] == [False] * 3 + [True] * 3
        assert s.finish_reason == "length" and sum(record_count(r) for r in led.history()) == 3
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, Decoder(runtime, mech(), led) as dec:
        s = dec.submit([1, 2], SamplingParams(max_tokens=50, stop_at_eos=False))
        it = iter(s)
        next(it)
        s.cancel()
        rest = list(it)
        assert s.finish_reason == "cancelled" and len(rest) < 49


def test_generation_stops_at_the_context(runtime):
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, Decoder(runtime, mech(queries=64), led) as dec:
        s = dec.submit(list(range(1, 61)), SamplingParams(max_tokens=20, stop_at_eos=False))
        assert len(list(s)) == 4 and s.finish_reason == "length"  # 60 + 4 = the 64 positions


def test_a_request_is_one_reservation_not_one_transaction_per_token(runtime):
    """max_tokens are reserved at admission in one transaction and the untaken part refunded in
    one more when the request ends; the tokens in between cost no ledger I/O."""
    from pmixed.privacy.ledger import REFUND

    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, Decoder(runtime, mech(queries=64), led) as dec:
        s = dec.submit([1, 2], SamplingParams(max_tokens=10, stop_at_eos=False))
        assert len(list(s)) == 10
        hist = led.history()
        assert [(r.count, r.mechanism) for r in hist] == [(10, "pmixed")]  # one grant, nothing to refund
        s = dec.submit([1, 2], SamplingParams(max_tokens=30, stop_at_eos=False))
        it = iter(s)
        got = [next(it) for _ in range(3)]
        s.cancel()
        got += list(it)
        hist = led.history()[1:]
        assert len(hist) == 2 and hist[0].count == 30 and hist[1].mechanism == REFUND
        assert sum(record_count(r) for r in hist) == len(got)  # the refund returns the untaken part


# ----------------------------------------------------------------- catch-up rows in few forwards

def _cost(batches, overhead):
    return sum(sum(len(g.adapters) for g in b) * max(len(g.tokens) for g in b) + overhead for b in batches)


def _groups(spec):
    return [RowGroup(list(range(rows)), tokens=[1] * n) for n, rows in spec]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 40), st.integers(1, 5)), min_size=1, max_size=12),
       st.integers(1, 4), st.integers(0, 200))
def test_every_group_once_and_the_cheapest_contiguous_split(spec, most, overhead):
    groups = _groups(spec)
    got = catch_up_batches(groups, most, overhead)
    assert 1 <= len(got) <= most
    assert sorted(id(g) for b in got for g in b) == sorted(id(g) for g in groups)
    lens = sorted({len(g.tokens) for g in groups})
    spans = [max(len(g.tokens) for g in b) for b in got]
    assert spans == sorted(spans)  # contiguous by pending count
    best = None
    for k in range(1, min(most, len(lens)) + 1):
        for cuts in itertools.combinations(range(1, len(lens)), k - 1):
            edges = [0, *cuts, len(lens)]
            split = [[g for g in groups if lens[a] <= len(g.tokens) <= lens[b - 1]] for a, b in zip(edges, edges[1:])]
            c = _cost(split, overhead)
            best = c if best is None else min(best, c)
    assert _cost(got, overhead) == best


def test_no_groups_and_one_count():
    assert catch_up_batches([]) == []
    groups = _groups([(3, 2), (3, 1)])
    assert catch_up_batches(groups) == [groups]
    # a few long catch-ups beside many short ones: split, since padding the short ones costs more
    mixed = _groups([(2, 1)] * 40 + [(30, 1)] * 2)
    got = catch_up_batches(mixed, overhead=16)
    assert len(got) == 2 and {len(g.tokens) for g in got[1]} == {30}


def test_split_catch_up_forwards_compute_what_one_forward_does(runtime, monkeypatch):
    """Drawn mode with members drawn on a fixed schedule, so that their catch-ups have different
    lengths: forwards split at every pending count (no forward cost) give the same tokens as one
    padded forward (a huge one), greedy; and the split does happen."""
    m = mech(q=0.5)
    schedule = itertools.cycle([[0], [1, 2], [0, 1], [2], [0, 1, 2], []])
    monkeypatch.setattr(m, "draw", lambda generator=None: torch.tensor(next(schedule), dtype=torch.long))
    calls = []
    real = scheduler_mod.catch_up_batches
    monkeypatch.setattr(scheduler_mod, "catch_up_batches", lambda gs, *a, **k: calls.append(out := real(gs, *a, **k)) or out)
    got = {}
    for cost in (0, 10**9):
        monkeypatch.setattr(scheduler_mod, "FORWARD_COST_POSITIONS", cost)
        schedule = itertools.cycle([[0], [1, 2], [0, 1], [2], [0, 1, 2], []])
        calls.clear()
        with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, Decoder(runtime, m, led, mode="drawn", uncovered_sampling=True) as dec:
            streams = [dec.submit(p, SamplingParams(max_tokens=10, top_k=1, stop_at_eos=False))
                       for p in ([1, 2, 3], [5, 6, 7, 8, 9, 10])]
            got[cost] = [[t.id for t in s] for s in streams]
        got[(cost, "most")] = max(len(c) for c in calls)
    assert got[0] == got[10**9]
    assert got[(0, "most")] > 1 and got[(10**9, "most")] == 1


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_split_prefill_equals_full_recomputation(runtime, monkeypatch, mode):
    """Prompts of different lengths prefilled in separate forwards (no forward cost), then decoded
    (in constant mode from the caches the split left): the same tokens as full recomputation."""
    monkeypatch.setattr(scheduler_mod, "FORWARD_COST_POSITIONS", 0)
    test_concurrent_batched_requests_equal_full_recomputation(runtime, mode)


LONG_PROMPTS = ([1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [11], [4] * 9, [2, 7] * 4)


@pytest.mark.parametrize("mode", ["constant", "drawn"])
@pytest.mark.parametrize("budget", [2, 5])
def test_chunked_prefill_equals_full_recomputation(runtime, mode, budget):
    """Prompts consumed a few tokens per step (several chunks, requests waiting for the budget,
    chunks beside decoding streams): the same tokens as full recomputation, greedy."""
    test_concurrent_batched_requests_equal_full_recomputation(runtime, mode, budget, LONG_PROMPTS)


def _manual_steps(runtime, mode, budget, m=None):
    """A decoder stepped by hand (no engine thread): one short request decoding, then a long
    prompt and a second short one arriving. Per step: (prompt tokens consumed by the requests
    that had sent nothing yet, tokens sent to the first stream)."""
    m = m or mech(q=1.0)
    lead = ALL if mode == "constant" else PUBLIC
    seen = lambda r: r.groups[lead].seen if lead in r.groups else 0  # noqa: E731
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        dec = Decoder(runtime, m, led, mode=mode, prefill_tokens=budget)  # not started: stepped here
        first = dec.submit([1, 2], SamplingParams(max_tokens=12, stop_at_eos=False))
        dec.step()
        later = [dec.submit(list(range(3, 20)), SamplingParams(max_tokens=3, stop_at_eos=False)),
                 dec.submit([9, 9, 9], SamplingParams(max_tokens=3, stop_at_eos=False))]
        steps = []
        while not all(s.done for s in later):
            reqs = list(dec._active) + list(dec._pending)
            before = [(r, r.generated, seen(r)) for r in reqs]
            sent = first.completion_tokens
            dec.step()
            took = sum(seen(r) - s0 for r, g0, s0 in before if g0 == 0)
            steps.append((took, first.completion_tokens - sent))
            assert len(steps) < 40
        dec.close()
    return steps, later


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_chunked_prefill_keeps_decoding_streams_stepping(runtime, mode):
    """With a budget of 4 prompt tokens per step, the 17-token prompt is consumed over several
    steps, no step consumes more than 4 prompt tokens, and the stream already decoding gets one
    token at every step meanwhile; without a budget the whole prompt goes in one step."""
    steps, later = _manual_steps(runtime, mode, 4)
    assert all(took <= 4 for took, _ in steps)
    assert all(sent == 1 for _, sent in steps)
    assert len(steps) >= 17 // 4 + 1
    assert [s.finish_reason for s in later] == ["length", "length"]
    steps, _ = _manual_steps(runtime, mode, None)
    assert max(took for took, _ in steps) >= 17


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_an_ended_request_lets_go_of_its_caches(runtime, mode):
    """A request that ends drops its caches at once: in constant mode its rows in the shared batch
    become free there (nothing copied out for it), and it holds no memory while its stream lives."""
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        dec = Decoder(runtime, mech(q=1.0), led, mode=mode)  # stepped here
        streams = [dec.submit([1, 2, 3], SamplingParams(max_tokens=n, stop_at_eos=False)) for n in (2, 4)]
        dec.step()
        reqs = list(dec._active)
        while not all(s.done for s in streams):
            dec.step()
        dec.close()
    assert len(reqs) == 2 and all(g.cache is None and g._batch is None for r in reqs for g in r.groups.values())


def _spy_warm_up(dec, monkeypatch) -> list[str]:
    """Run ``dec.warm_up()`` with every draw refused and the release kernels counted; returns the
    names of the kernels it ran."""
    ran: list[str] = []

    def no_draw(*a, **k):
        raise AssertionError("warm-up drew members")

    for name in ("draw", "draw_mask", "new_screen"):
        if hasattr(dec.mechanism, name):
            monkeypatch.setattr(dec.mechanism, name, no_draw)
    for name in ("release_masked", "sample"):
        real = getattr(scheduler_mod, name)
        monkeypatch.setattr(scheduler_mod, name, lambda *a, _r=real, _n=name, **k: ran.append(_n) or _r(*a, **k))
    real_release = dec.mechanism.release
    monkeypatch.setattr(dec.mechanism, "release", lambda *a, **k: ran.append("release") or real_release(*a, **k))
    assert dec.warm_up() >= 0
    return ran


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_warm_up_runs_the_kernels_and_draws_charges_and_counts_nothing(runtime, mode, monkeypatch):
    """``warm_up`` (``pmixed serve`` calls it before serving) runs the forward and the mechanism's
    kernels on public dummy input: nothing drawn, charged or counted, and the requests that follow
    are the same as without it."""
    m = mech(q=1.0)
    prompts = ([1, 2, 3], [5, 6])
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        dec = Decoder(runtime, m, led, mode=mode, uncovered_sampling=True)
        before = dec.stats()
        with monkeypatch.context() as mp:
            ran = _spy_warm_up(dec, mp)
        assert {"release_masked", "release", "sample"} <= set(ran)
        assert led.charges() == 0 and dec.stats() == before
        with dec:
            outs = [list(s) for s in [dec.submit(p, SamplingParams(max_tokens=3, top_k=1, stop_at_eos=False))
                                      for p in prompts]]
    for p, out in zip(prompts, outs):
        assert [t.id for t in out] == greedy_reference(runtime, m, p, 3)


def test_sampling_the_guarantee_does_not_cover_is_refused_before_anything_is_charged(runtime):
    """temperature / top_p / top_k other than the defaults act on each draw's mixture (a mechanism
    the proof does not cover: tests/exact/test_exact_sampling.py); only an experiment's decoder
    (``uncovered_sampling=True``) takes them."""
    m = mech()
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led, Decoder(runtime, m, led) as dec:
        for kw in ({"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 1}):
            with pytest.raises(ValueError, match="not covered by the privacy guarantee"):
                dec.submit([1, 2], SamplingParams(max_tokens=3, **kw))
        assert led.charges() == 0 and dec.stats()["requests"] == 0
        assert len(list(dec.submit([1, 2], SamplingParams(max_tokens=3, stop_at_eos=False)))) == 3
