"""Screened PMixED (``--mechanism adaptive``) in the batched decode engine and the server: one
unit is taken from the reservation before each screen round opens and every token sent is
covered by a paid unit; a budget that runs out ends the stream with "budget"; a public screen
(huge threshold) answers from the public model after one unit and, in drawn mode, runs no
member; a threshold of -1e9 makes every token private (one unit each) and equals the PMixED
release; constant-work mode does the same work whatever the screen decides; GET /v1/privacy
reports the filter; a ledger of another acceptance rule is refused at start-up in one line."""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest

torch = pytest.importorskip("torch")

from pmixed.mechanism.adaptive import AdaptivePMixED  # noqa: E402
from pmixed.mechanism.screen import Screen  # noqa: E402
from pmixed.models.runtime import PUBLIC, EnsembleRuntime  # noqa: E402
from pmixed.privacy.ledger import MEMORY, Ledger, Reservation, record_count  # noqa: E402
from pmixed.serve.scheduler import Decoder  # noqa: E402
from pmixed.serve.stream import SamplingParams, Stream  # noqa: E402
from tests.models.test_stacked_lora import ARCHS, save_adapters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

N = 3
PUBLIC_SCREEN = 1e9  # no score reaches it: every token from the public model
PRIVATE_SCREEN = -1e9  # every score reaches it: every token private


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    make, targets, fifo = ARCHS["gpt2"]
    base = make()
    dirs = save_adapters(base, targets, fifo, tmp_path_factory.mktemp("adaptive"), n=N)
    return EnsembleRuntime(base, None, dirs)  # context 64


def mech(threshold=0.0, *, q=1.0, weight=0.0, screen_epsilon=0.0, units=64, epsilon=8.0):
    return AdaptivePMixED(epsilon=epsilon, delta=1e-5, private_queries=units, ensemble_size=N, sample_rate=q,
                          screen_threshold=threshold, screen_weight=weight, screen_epsilon=screen_epsilon,
                          lam_max=0.9)


def ledger(m, epsilon=8.0, where=MEMORY):
    return Ledger(where, epsilon=epsilon, delta=1e-5, rule=m.rule)


def net_units(led) -> int:
    return sum(record_count(r) for r in led.history())


def epsilon_for_units(m, k: int) -> float:
    """A ledger limit (under m's filter) that pays for exactly k units, not k + 1."""
    eps = []
    for count in (k, k + 1):
        with Ledger(MEMORY, epsilon=1e6, delta=1e-5, rule=m.rule) as led:
            c = m.charge(led.orders)
            from dataclasses import replace

            led.charge(replace(c, count=count))
            eps.append(led.epsilon_spent())
    return (eps[0] + eps[1]) / 2


def greedy(rt, m, prompt, n, *, private: bool):
    """Full recomputation of every prefix, greedy: the PMixED release with every member (q = 1),
    or the public model alone."""
    seq, out = list(prompt), []
    for _ in range(n):
        ids = torch.tensor([seq])
        pub = rt.probs(ids, [PUBLIC])[0, -1].double()
        if private:
            mem = torch.stack([rt.probs(ids, [i])[0, -1].double() for i in range(N)])
            dist = m.release(pub, mem)
        else:
            dist = pub
        tok = int(torch.argmax(dist))
        seq.append(tok)
        out.append(tok)
    return out


class Events:
    """The engine thread's order of events: T a unit taken, O a round opened, P / U the screen's
    decision (private / public), S a token sent, per screen (each request has its own)."""

    def __init__(self, monkeypatch):
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        real_take, real_open, real_decide, real_put = (Reservation.take, Screen.open_round, Screen.decide,
                                                       Stream.put)
        ev = self

        def take(self, n=1):
            ok = real_take(self, n)
            if ok:
                ev.add("T", 0)
            return ok

        def open_round(self):
            ev.add("O", id(self))
            return real_open(self)

        def decide(self, entropy, member_scores=None, **kw):
            private = real_decide(self, entropy, member_scores, **kw)
            ev.add("P" if private else "U", id(self))
            return private

        def put(self, token):
            ev.add("S", 0)
            return real_put(self, token)

        monkeypatch.setattr(Reservation, "take", take)
        monkeypatch.setattr(Screen, "open_round", open_round)
        monkeypatch.setattr(Screen, "decide", decide)
        monkeypatch.setattr(Stream, "put", put)

    def add(self, kind, who):
        with self.lock:
            self.log.append((kind, who))

    def string(self) -> str:
        return "".join(k for k, _ in self.log)


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_one_unit_per_round_and_no_token_without_a_paid_unit(runtime, monkeypatch, mode):
    """A private, noisy screen (mixed decisions): one request's events are exactly
    (take, open, (public, send)*, private, send)*, and the ledger's net charge is the units taken."""
    m = mech(threshold=4.0, q=0.5, weight=1.0, screen_epsilon=0.05, units=32)
    ev = Events(monkeypatch)
    with ledger(m) as led, Decoder(runtime, m, led, mode=mode) as dec:
        s = dec.submit([1, 2, 3], SamplingParams(max_tokens=24, stop_at_eos=False))
        toks = list(s)
        stats = dec.stats()
        assert len(toks) == 24 and s.finish_reason == "length"
        seq = ev.string()
        assert re.fullmatch(r"(TO(US)*PS)*(TO(US)*)?", seq), seq
        units = seq.count("T")
        assert units == seq.count("O") == stats["units"] >= 1
        assert net_units(led) == units  # the reservation's untaken part was refunded
        assert stats["tokens_private"] == 24 and stats["tokens_screened_public"] == seq.count("U")
        assert not any(t.public_only for t in toks)  # screened answers are not "public continuation"
    assert 0 < seq.count("P") < 24, "the screen should mix both decisions here"


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_budget_runs_out_ends_the_stream_with_budget(runtime, mode):
    m = mech(threshold=PRIVATE_SCREEN)
    k = 5
    with ledger(m, epsilon=epsilon_for_units(m, k)) as led, Decoder(runtime, m, led, mode=mode) as dec:
        s = dec.submit([1, 2], SamplingParams(max_tokens=12, stop_at_eos=False))
        assert len(list(s)) == k and s.finish_reason == "budget"
        assert net_units(led) == k and led.queries_left(m.charge(led.orders).rdp) == 0
        s = dec.submit([1, 2], SamplingParams(max_tokens=3))  # nothing left: no token at all
        assert list(s) == [] and s.finish_reason == "budget"
        assert dec.privacy()["queries_left"] == 0


def test_budget_runs_out_with_public_continuation(runtime):
    m = mech(threshold=PRIVATE_SCREEN)
    with ledger(m, epsilon=epsilon_for_units(m, 3)) as led, \
            Decoder(runtime, m, led, public_continuation=True) as dec:
        s = dec.submit([1, 2], SamplingParams(max_tokens=6, stop_at_eos=False))
        toks = list(s)
        assert [t.public_only for t in toks] == [False] * 3 + [True] * 3
        assert s.finish_reason == "length" and net_units(led) == 3


def _rows(runtime, monkeypatch) -> list[list[list[int]]]:
    """Spy on the runtime: the adapters of each group of each forward."""
    calls: list[list[list[int]]] = []
    real = type(runtime).decode

    def spy(self, groups, **kw):
        calls.append([list(g.adapters) for g in groups])
        return real(self, groups, **kw)

    monkeypatch.setattr(type(runtime), "decode", spy)
    return calls


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_a_public_screen_answers_from_the_public_model_after_one_unit(runtime, monkeypatch, mode):
    m = mech(threshold=PUBLIC_SCREEN, q=0.5)
    calls = _rows(runtime, monkeypatch)
    prompt = [4, 5, 6]
    with ledger(m) as led, Decoder(runtime, m, led, mode=mode, uncovered_sampling=True) as dec:
        s = dec.submit(prompt, SamplingParams(max_tokens=8, top_k=1, stop_at_eos=False))
        got = [t.id for t in s]
        assert net_units(led) == 1 and dec.stats()["units"] == 1
        assert dec.stats()["tokens_screened_public"] == 8
    monkeypatch.undo()
    assert got == greedy(runtime, m, prompt, 8, private=False)
    rows = {a for call in calls for g in call for a in g}
    if mode == "drawn":
        assert rows == {PUBLIC}  # no member ran for a public answer
    else:
        assert rows == {PUBLIC, *range(N)}  # constant work: every member, every token


@pytest.mark.parametrize("mode", ["constant", "drawn"])
@pytest.mark.parametrize("prefill_tokens", [None, 2])
def test_a_threshold_of_minus_1e9_makes_every_token_private(runtime, mode, prefill_tokens):
    """(prefill_tokens = 2: the prompt is consumed over two steps, chunked prefill.)"""
    m = mech(threshold=PRIVATE_SCREEN, q=1.0)
    prompt = [7, 8, 9, 10]
    with ledger(m) as led, Decoder(runtime, m, led, mode=mode, prefill_tokens=prefill_tokens, uncovered_sampling=True) as dec:
        s = dec.submit(prompt, SamplingParams(max_tokens=7, top_k=1, stop_at_eos=False))
        got = [t.id for t in s]
        assert net_units(led) == 7 and dec.stats()["units"] == 7
        assert dec.stats()["tokens_screened_public"] == 0
        assert [(r.count, r.mechanism) for r in led.history()][0] == (7, "pmixed/adaptive")
    assert got == greedy(runtime, m, prompt, 7, private=True)


@pytest.mark.parametrize("private_screen", [False, True])
def test_drawn_mode_runs_a_private_streams_members_with_its_public_row(runtime, monkeypatch, private_screen):
    """After a private answer the next answer's draw (and, with a private score, the next round's
    test subsample) is made before the screen decides and its members join the public row's
    forward: one forward per step, not two or three (the first step has no previous bit: public
    row, then the test members, then the drawn ones), and the same tokens."""
    if private_screen:  # every member a test member (q_s = 1), few drawn: the test rows always matter
        m = AdaptivePMixED(epsilon=8.0, delta=1e-5, private_queries=8, ensemble_size=N, sample_rate=0.05,
                           screen_threshold=PRIVATE_SCREEN, screen_weight=1.0, screen_epsilon=0.05, screen_rate=1.0,
                           lam_max=0.9)
    else:
        m = mech(threshold=PRIVATE_SCREEN, q=1.0)
    forwards: list[list[list[int]]] = []
    real = Decoder._forward

    def spy(self, groups, persistent):
        if groups:
            forwards.append([list(g.adapters) for g in groups])
        return real(self, groups, persistent)

    monkeypatch.setattr(Decoder, "_forward", spy)
    prompt = [7, 8, 9, 10]
    with ledger(m) as led, Decoder(runtime, m, led, mode="drawn", uncovered_sampling=True) as dec:
        got = [t.id for t in dec.submit(prompt, SamplingParams(max_tokens=6, top_k=1, stop_at_eos=False))]
        assert net_units(led) == 6
    monkeypatch.undo()
    # step 1 (no previous bit): the public row, then the round's test members (private score: all
    # N) or the drawn members (q = 1: all N); steps 2-6: one forward each holding every row
    assert len(forwards) == 2 + 5, forwards
    assert forwards[0] == [[PUBLIC]]
    assert all(sorted(a for g in c for a in g) == [PUBLIC, *range(N)] for c in forwards[2:]), forwards
    if not private_screen:
        assert got == greedy(runtime, m, prompt, 6, private=True)


@pytest.mark.parametrize("prefill_tokens", [None, 2])
def test_constant_mode_work_does_not_depend_on_the_screen(runtime, monkeypatch, prefill_tokens):
    """The rows run and the releases computed per step are the same whether the screen answers
    every token privately or every token from the public model (also with chunked prefill)."""
    import pmixed.serve.scheduler as sched

    runs = []
    for threshold in (PUBLIC_SCREEN, PRIVATE_SCREEN):
        with monkeypatch.context() as mp:
            calls = _rows(runtime, mp)
            masked = []
            real = sched.release_masked
            mp.setattr(sched, "release_masked",
                       lambda *a, masked=masked, real=real, **k: masked.append(1) or real(*a, **k))
            m = mech(threshold=threshold, q=0.5)
            with ledger(m) as led, Decoder(runtime, m, led, prefill_tokens=prefill_tokens) as dec:
                s = dec.submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=5, stop_at_eos=False))
                assert len(list(s)) == 5
            runs.append((calls, len(masked)))
    assert runs[0] == runs[1] and runs[0][1] == 5


def test_concurrent_requests_never_exceed_the_units(runtime):
    m = mech(threshold=PRIVATE_SCREEN, q=0.5)
    k = 20
    with ledger(m, epsilon=epsilon_for_units(m, k)) as led:
        with Decoder(runtime, m, led, mode="constant", max_active=8, max_queue=32) as dec:
            streams = [dec.submit([1 + i % 7, 2], SamplingParams(max_tokens=4, stop_at_eos=False))
                       for i in range(12)]
            sent = [len(list(s)) for s in streams]
        assert net_units(led) == sum(sent) == k  # every token private: one unit each, all spent
        assert led.queries_left(m.charge(led.orders).rdp) == 0
    assert {s.finish_reason for s in streams} == {"length", "budget"}


def test_a_ledger_of_another_rule_is_refused(runtime, tmp_path):
    from pmixed.errors import LedgerError

    m = mech()
    Ledger(tmp_path / "best.ledger", epsilon=8.0, delta=1e-5).close()  # the default: best-order
    with pytest.raises(LedgerError, match="acceptance rule 'best-order'"):
        ledger(m, where=tmp_path / "best.ledger")
    with Ledger(MEMORY, epsilon=8.0, delta=1e-5) as led, pytest.raises(LedgerError, match="Renyi filter"):
        Decoder(runtime, m, led)


# ---------------------------------------------------------------- the server
def test_privacy_endpoint_and_completions_in_adaptive_mode(serve_run, serve_runtime, tmp_path):
    from tests.serve.conftest import ServerFactory

    cfg, _ = serve_run
    m = AdaptivePMixED.from_config(cfg.privacy, serve_runtime.n_members, screen_threshold=PUBLIC_SCREEN)
    servers = ServerFactory(cfg, serve_runtime, tmp_path)
    s = servers.start(mechanism=m, quota=100)
    try:
        auth = {"Authorization": f"Bearer {s.user_key}"}
        p = httpx.get(s.url + "/v1/privacy", headers=auth, timeout=10).json()
        assert p["mechanism"] == "adaptive" and p["filter_order"] == m.order
        assert p["acceptance_rule"] == f"renyi-filter/alpha={m.order}"
        assert p["epsilon_spent"] == 0.0 and p["epsilon_left"] == p["epsilon_limit"] == cfg.privacy.epsilon
        assert p["queries_left"] == p["units_left"] == m.max_units() >= cfg.privacy.queries
        assert "private answer" in p["queries_left_note"] and "cost nothing" in p["queries_left_note"]
        assert p["key"]["name"] == "user" and p["mode"] == "constant"
        c = openai.OpenAI(base_url=s.base_url, api_key=s.user_key, max_retries=0, timeout=30)
        r = c.completions.create(model="tiny", prompt="the apple and", max_tokens=6)
        n = r.usage.completion_tokens
        assert 1 <= n <= 6 and r.choices[0].finish_reason in ("stop", "length")
        chunks = list(c.chat.completions.create(model="tiny", max_tokens=5, stream=True,
                                                messages=[{"role": "user", "content": "hi"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        for _ in range(200):  # bounded: the engine ends the streams and refunds at its next step
            if s.decoder.stats()["active"] == 0:
                break
            time.sleep(0.02)
        assert net_units(s.ledger) == 2  # one unit per request: the public screen never closed a round
        p2 = httpx.get(s.url + "/v1/privacy", headers=auth, timeout=10).json()
        assert p2["queries_left"] == p["queries_left"] - 2
        assert abs(p2["epsilon_spent"] - m.epsilon_after(2)) < 1e-9
        assert p2["key"]["used"] >= n + 1  # the quota counts tokens sent, not units
        text = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {s.admin_key}"}, timeout=10).text
        assert f"pmixed_budget_filter_order {float(m.order)}" in text
        assert "pmixed_engine_units_total 2.0" in text and "pmixed_engine_tokens_screened_public_total" in text
    finally:
        servers.close()


def test_serve_cli_refuses_a_ledger_of_another_rule_in_one_line(serve_run, tmp_path, capsys):
    from pmixed.cli import main
    from pmixed.serve.keys import KeyStore

    cfg, cfg_path = serve_run
    kf = tmp_path / "keys.db"
    KeyStore(kf).create("c")
    path = tmp_path / "best.ledger"
    Ledger(path, epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta).close()
    with pytest.raises(SystemExit) as ex:
        main(["serve", "--config", str(cfg_path), "--keys", str(kf), "--ledger", str(path), "--mechanism", "adaptive"])
    err = capsys.readouterr().err
    assert ex.value.code == 4 and err.startswith("error: ") and err.count("\n") == 1
    assert "best-order" in err and "renyi-filter" in err and "new --ledger path" in err
    with pytest.raises(SystemExit) as ex:
        main(["serve", "--config", str(cfg_path), "--keys", str(kf), "--mechanism", "screened"])
    assert ex.value.code == 2 and "mechanism" in capsys.readouterr().err


def test_pmixed_serve_mechanism_adaptive_on_loopback(serve_run, tmp_path):
    """The real command: ``pmixed serve --mechanism adaptive`` opens its ledger under the filter,
    says so at start-up and in GET /v1/privacy, and stops cleanly on SIGTERM."""

    from pmixed.serve.keys import KeyStore
    from tests.serve.conftest import start_serve, stop_serve

    cfg, cfg_path = serve_run
    kf, path = tmp_path / "keys.db", tmp_path / "serve.ledger"
    _, key = KeyStore(kf).create("c")
    proc, url = start_serve(cfg_path, kf, path, "--mechanism", "adaptive", "--mode", "drawn")
    try:
        p = httpx.get(url + "/v1/privacy", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        m = AdaptivePMixED.from_config(cfg.privacy, cfg.data.n_parts)
        assert p["mechanism"] == "adaptive" and p["filter_order"] == m.order and p["mode"] == "drawn"
        assert p["queries_left"] == m.max_units()
    finally:
        err = stop_serve(proc)
    assert proc.returncode == 0, err
    assert f"mechanism adaptive, Renyi filter order {m.order}" in err and "units left" in err
    with Ledger.open(path) as led:
        assert led.rule == m.rule and led.charges() == 0


@pytest.mark.parametrize("mode", ["constant", "drawn"])
def test_warm_up_runs_the_screen_and_spends_no_unit(runtime, mode, monkeypatch):
    """Screened PMixED's warm-up also runs the screen's statistics, and opens no round."""
    from pmixed.serve import scheduler as scheduler_mod
    from tests.serve.test_scheduler import _spy_warm_up

    m = mech(threshold=PRIVATE_SCREEN, q=0.5, screen_epsilon=1.0)
    ran: list[str] = []
    for name in ("chi_square", "public_entropy"):
        real = getattr(scheduler_mod, name)
        monkeypatch.setattr(scheduler_mod, name, lambda *a, _r=real, _n=name, **k: ran.append(_n) or _r(*a, **k))
    with ledger(m) as led:
        dec = Decoder(runtime, m, led, mode=mode)
        before = dec.stats()
        ran += _spy_warm_up(dec, monkeypatch)
        assert {"chi_square", "public_entropy", "release_masked", "release", "sample"} <= set(ran)
        assert led.charges() == 0 and dec.stats() == before
