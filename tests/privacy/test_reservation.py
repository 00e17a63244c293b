"""Reservations (Ledger.reserve / Reservation.take / Reservation.close) over every store: a grant
is charged in one transaction before any of it is handed out, the untaken part is refunded in one
transaction on close, the spent budget afterwards is what the taken queries cost (never less),
refunds are replayed and audited on open, and neither interleavings, concurrent processes nor a
SIGKILL let a taken query go uncharged."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmixed.errors import BudgetExhausted, ConfigError, LedgerError
from pmixed.privacy.accountant import DEFAULT_ORDERS, RdpCharge
from pmixed.privacy.ledger import REFUND, Ledger, Reservation, net_count, record_count

from .memory_store import MemoryDatabase
from .pg import budget_url, server_url
from .test_ledger_stores import DELTA, FIXED, limit_for

K = 30
#: A limit that affords exactly K queries of FIXED, robustly (K + 1 is far above it).
LIMIT = limit_for(K) * (1 + 1e-9)


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def where(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "budget.ledger")
    if request.param == "memory":
        return MemoryDatabase().opener()
    return budget_url()


@pytest.fixture(params=["sqlite", "postgres"])
def shared_where(request, tmp_path):
    """A ledger several processes can open."""
    if request.param == "sqlite":
        return str(tmp_path / "budget.ledger")
    return budget_url()


def reference(n: int) -> Ledger:
    """A ledger that was charged ``n`` FIXED queries one by one."""
    led = Ledger(":memory:", epsilon=LIMIT, delta=DELTA)
    for _ in range(n):
        led.charge(FIXED)
    return led


def assert_spent_is(led: Ledger, taken: int, exact: bool = True) -> None:
    """The ledger's spent budget is what ``taken`` queries cost: never less (exactly, per order,
    when only reservations were used), the same epsilon and the same queries left."""
    ref = reference(taken)
    try:
        for s, r in zip(led.spent_rdp(), FIXED.rdp, strict=True):
            if exact:
                assert Fraction(s) >= taken * Fraction(r)
            assert s == pytest.approx(taken * r, rel=1e-12, abs=1e-15)
        assert led.epsilon_spent() == pytest.approx(ref.epsilon_spent(), rel=1e-12)
        assert led.queries_left(FIXED.rdp) == K - taken == ref.queries_left(FIXED.rdp)
    finally:
        ref.close()


class TestReservationsOverAnyStore:
    def test_grant_take_close_refunds_the_untaken_part(self, where):
        with Ledger(where, epsilon=LIMIT, delta=DELTA) as led:
            res = led.reserve(FIXED, 10)
            assert isinstance(res, Reservation)
            assert (res.granted, res.used, res.remaining, res.closed) == (10, 0, 10, False)
            assert res.charge_id == 1 and res.receipt.id == 1
            assert led.charges() == 1 and led.queries_left(FIXED.rdp) == K - 10  # charged up front
            (grant,) = led.history()
            assert (grant.count, grant.label, grant.rdp) == (10, "fixed", FIXED.rdp)
            assert all(res.take() for _ in range(3))
            assert res.take(2) and not res.take(6) and res.used == 5  # all or nothing
            refund = res.close()
            assert refund is not None and refund.id == 2 and res.refund == refund and res.closed
            assert res.close() == refund and led.charges() == 2  # idempotent: one refund
            assert not res.take() and res.remaining == 0
            rec = led.history()[-1]
            assert (rec.mechanism, rec.count, rec.label) == (REFUND, 1, "fixed")
            assert rec.params == {"refund_of": 1, "queries": 5, "granted": 10, "used": 5}
            assert rec.epsilon_after == led.epsilon_spent() == refund.epsilon_spent
            assert [record_count(r) for r in led.history()] == [10, -5] and net_count(led.history()) == 5
            assert_spent_is(led, 5)
        with Ledger.open(where) as led:  # the refund replays on open
            assert_spent_is(led, 5)

    def test_the_grant_is_capped_by_the_budget_and_zero_records_nothing(self, where):
        with Ledger(where, epsilon=LIMIT, delta=DELTA) as led:
            led.charge(FIXED)
            with led.reserve(FIXED, 10**9) as res:  # the rest of the budget
                assert res.granted == K - 1 and led.queries_left(FIXED.rdp) == 0
                assert res.take(K - 1) and not res.take()
            assert led.charges() == 2  # fully used: no refund record
            empty = led.reserve(FIXED, 5)
            assert (empty.granted, empty.closed, empty.charge_id, empty.receipt) == (0, True, None, None)
            assert not empty.take() and empty.close() is None and led.charges() == 2
            with pytest.raises(BudgetExhausted):
                led.charge(FIXED)
            assert_spent_is(led, K, exact=False)

    def test_up_to_zero_and_bad_arguments(self, where):
        with Ledger(where, epsilon=LIMIT, delta=DELTA) as led:
            assert led.reserve(FIXED, 0).granted == 0 and led.charges() == 0
            for bad in (-1, True, 2.0, None):
                with pytest.raises(ConfigError, match="up_to"):
                    led.reserve(FIXED, bad)
            with pytest.raises(ConfigError, match="count 1"):
                led.reserve(RdpCharge(DEFAULT_ORDERS, FIXED.rdp, count=2), 3)
            refund_like = RdpCharge(DEFAULT_ORDERS, FIXED.rdp, mechanism=REFUND)
            with pytest.raises(ConfigError, match="reserved"):
                led.charge(refund_like)
            with pytest.raises(ConfigError, match="reserved"):
                led.reserve(refund_like, 2)
            res = led.reserve(FIXED, 2)
            with pytest.raises(ConfigError):
                res.take(0)
            res.close()
            assert led.charges() == 2 and net_count(led.history()) == 0
            assert_spent_is(led, 0)

    def test_reservations_and_charges_interleave(self, where):
        with Ledger(where, epsilon=LIMIT, delta=DELTA) as led:
            a = led.reserve(FIXED, 8)
            led.charge(FIXED)
            b = led.reserve(FIXED, 100)
            assert b.granted == K - 9
            assert a.take(4) and b.take(3)
            a.close()
            assert led.queries_left(FIXED.rdp) == 4
            with led.reserve(FIXED, 100) as c:
                assert c.granted == 4 and c.take(1)
            b.close()
            taken = 4 + 1 + 3 + 1
            assert net_count(led.history()) == taken
            assert_spent_is(led, taken, exact=False)
            ids = {r.id: r for r in led.history()}
            refunds = [r for r in led.history() if r.mechanism == REFUND]
            assert [ids[r.params["refund_of"]].count for r in refunds] == [8, 4, K - 9]

    def test_a_closed_ledger_keeps_the_grant_charged(self, where):
        led = Ledger(where, epsilon=LIMIT, delta=DELTA)
        res = led.reserve(FIXED, 6)
        assert res.take(2)
        led.close()
        with pytest.raises(LedgerError, match="closed"):
            res.close()  # the untaken part stays charged: wasted, never released
        assert not res.take()
        with Ledger.open(where) as led:
            assert net_count(led.history()) == 6
            assert led.queries_left(FIXED.rdp) == K - 6


def test_refund_rounding_never_charges_less():
    """Per-query curves that are not exact in binary, a total far larger than the refund: the
    refund removes at most what the grant added minus the taken queries' cost, exactly."""
    orders = DEFAULT_ORDERS
    rng = random.Random(7)
    for _ in range(30):
        rdp = tuple(a * rng.uniform(1e-4, 1e-2) / 3 for a in orders)
        c = RdpCharge(orders, rdp)
        with Ledger(":memory:", epsilon=1e6, delta=DELTA) as led:
            led.charge(RdpCharge(orders, tuple(r * 1e5 / 7 for r in rdp), count=3))
            before = led.spent_rdp()
            k, used = rng.randint(1, 500), None
            with led.reserve(c, k) as res:
                used = rng.randint(0, res.granted)
                if used:
                    assert res.take(used)
            for b, s, r in zip(before, led.spent_rdp(), rdp, strict=True):
                assert Fraction(s) - Fraction(b) >= used * Fraction(r)
                assert s - b == pytest.approx(used * r, rel=1e-6, abs=1e-9 * s)


def test_a_forged_refund_is_detected_on_open(tmp_path):
    """A refund that removes more than the queries it names (totals edited to match) is caught by
    the replay's audit, as is a refund of more queries than were granted."""
    from pmixed.privacy.ledger_store import dump_curve as _dump_curve

    for forge in ("rdp", "queries"):
        path = str(tmp_path / f"{forge}.ledger")
        with Ledger(path, epsilon=LIMIT, delta=DELTA) as led:
            with led.reserve(FIXED, 10) as res:
                res.take(4)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            if forge == "rdp":  # remove all 10 queries' cost (and fix the totals up to match)
                removed = tuple(r * 10 for r in FIXED.rdp)
                conn.execute("UPDATE charges SET rdp = ? WHERE id = 2", (_dump_curve(removed),))
                conn.execute("UPDATE totals SET rdp = ?", (_dump_curve((0.0,) * len(DEFAULT_ORDERS)),))
                conn.execute("UPDATE charges SET epsilon_after = 0.0 WHERE id = 2")
            else:
                conn.execute("""UPDATE charges SET params = '{"granted":10,"queries":11,"refund_of":1,"used":4}' WHERE id = 2""")
        finally:
            conn.close()
        with pytest.raises(LedgerError, match="refund record 2 is invalid") as e:
            Ledger.open(path)
        assert "\n" not in str(e.value)


# --- any interleaving ------------------------------------------------------------------------------
ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 12)),
        st.tuples(st.just("take"), st.integers(0, 7), st.integers(1, 4)),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("charge")),
    ),
    max_size=40,
)


def _run_interleaving(where, seq) -> None:
    with Ledger(where, epsilon=LIMIT, delta=DELTA) as led:
        held: list[Reservation] = []
        taken = 0
        direct = False
        for op in seq:
            if op[0] == "reserve":
                held.append(led.reserve(FIXED, op[1]))
            elif op[0] == "take" and held:
                res = held[op[1] % len(held)]
                if res.take(op[2]):
                    taken += op[2]
            elif op[0] == "close" and held:
                held[op[1] % len(held)].close()
            elif op[0] == "charge":
                try:
                    led.charge(FIXED)
                    taken += 1
                    direct = True
                except BudgetExhausted:
                    pass
            outstanding = sum(r.remaining for r in held)
            assert taken <= K
            assert led.queries_left(FIXED.rdp) == K - taken - outstanding  # taken + held = spent
            assert led.epsilon_spent() <= led.epsilon
        for res in held:
            res.close()
        assert net_count(led.history()) == taken
        assert_spent_is(led, taken, exact=not direct)
    with Ledger.open(where) as led:  # and the history replays to the same totals
        assert led.queries_left(FIXED.rdp) == K - taken


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=ops)
def test_property_any_interleaving_never_overspends_and_ends_at_the_taken(store, tmp_path_factory, seq):
    where = MemoryDatabase().opener() if store == "memory" else str(tmp_path_factory.mktemp("p") / "b.ledger")
    _run_interleaving(where, seq)


@pytest.fixture
def postgres_server():
    return server_url()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=ops)
def test_property_any_interleaving_over_postgres(postgres_server, seq):
    _run_interleaving(budget_url(), seq)


# --- processes -------------------------------------------------------------------------------------
def _worker(where: str, seed: int, out) -> None:
    """Reserve, take some, close; or charge one; until the budget is gone for this process."""
    rng = random.Random(seed)
    taken = 0
    dry = 0
    try:
        with Ledger.open(where) as led:
            while dry < 30:
                if rng.random() < 0.25:
                    try:
                        led.charge(FIXED)
                        taken += 1
                        dry = 0
                    except BudgetExhausted:
                        dry += 1
                    continue
                with led.reserve(FIXED, rng.randint(1, 6)) as res:
                    if res.granted == 0:
                        dry += 1
                        continue
                    dry = 0
                    want = rng.randint(0, res.granted + 1)
                    while want and res.take():
                        taken += 1
                        want -= 1
        out.put(("ok", taken))
    except BaseException as e:  # reported to the parent
        out.put(("error", f"{e!r} after {taken} taken"))


def test_processes_hammering_one_budget_never_overspend(shared_where):
    n_queries = 80
    limit = limit_for(n_queries) * (1 + 1e-9)
    Ledger(shared_where, epsilon=limit, delta=DELTA).close()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(shared_where, seed, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(r[0] == "ok" for r in results), results
    taken = sum(r[1] for r in results)
    with Ledger.open(shared_where) as led:  # replays every grant and refund
        assert taken <= n_queries and net_count(led.history()) == taken  # every taken query charged
        assert led.queries_left(FIXED.rdp) == n_queries - taken
        assert led.epsilon_spent() <= led.epsilon
        assert any(r.mechanism == REFUND for r in led.history())
        assert sum(r.count for r in led.history() if r.mechanism != REFUND) > taken  # refunds happened


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pmixed.privacy.ledger import Ledger
    from tests.privacy.test_ledger_stores import FIXED
    led = Ledger.open(sys.argv[1])
    res = led.reserve(FIXED, 20)
    taken = 0
    while taken < 7 and res.take():
        taken += 1
    print("took", taken, res.granted, flush=True)
    time.sleep(600)
    """
)


def test_sigkill_while_holding_a_reservation_leaves_spent_at_least_taken(shared_where):
    Ledger(shared_where, epsilon=LIMIT, delta=DELTA).close()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, shared_where], stdout=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["took"], line
        took, granted = int(line[1]), int(line[2])
        assert (took, granted) == (7, 20)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    with Ledger.open(shared_where) as led:
        assert net_count(led.history()) == granted >= took  # the unused part is wasted, not released
        assert led.queries_left(FIXED.rdp) == K - granted
        assert math.isclose(led.epsilon_spent(), limit_for(granted), rel_tol=1e-12)
