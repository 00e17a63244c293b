"""The durable ledger (pmixed.privacy.ledger): restart, refusals, foreign files, concurrency, crashes."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import sqlite3
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.errors import BudgetExhausted, ConfigError, LedgerError
from pmixed.privacy.accountant import (
    DEFAULT_ORDERS,
    RdpAccountant,
    RdpCharge,
    compose_curve,
    curve_epsilon,
)
from pmixed.privacy.ledger import APPLICATION_ID, FORMAT, SCHEMA_VERSION, Ledger, Receipt
from pmixed.privacy.ledger_sqlite import SqliteLedgerStore

DELTA = 1e-5
# a fixed curve with exact binary values, so that K charges sum without rounding
FIXED = RdpCharge(DEFAULT_ORDERS, tuple(a / 64 for a in DEFAULT_ORDERS), label="fixed")


def limit_for(k: int, charge: RdpCharge = FIXED, orders=DEFAULT_ORDERS) -> float:
    """The epsilon spent by exactly k charges: a budget that admits k and refuses the k+1-th."""
    curve = (0.0,) * len(orders)
    for _ in range(k):
        curve = compose_curve(curve, charge.rdp, charge.count)
    return curve_epsilon(orders, curve, DELTA)


def rows_sum(path) -> tuple[tuple[float, ...], int]:
    """Sum the charges table with plain sqlite3 (independently of Ledger)."""
    conn = sqlite3.connect(path)
    try:
        curve = (0.0,) * len(DEFAULT_ORDERS)
        n = 0
        for count, rdp in conn.execute("SELECT count, rdp FROM charges ORDER BY id"):
            vals = [math.inf if v is None else v for v in json.loads(rdp)]
            curve = compose_curve(curve, vals, count)
            n += 1
        totals = [math.inf if v is None else v for v in json.loads(conn.execute("SELECT rdp FROM totals").fetchone()[0])]
        assert tuple(totals) == curve, "totals row != sum of charge rows"
        return curve, n
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "budget.ledger")


# --- basics -------------------------------------------------------------------------------------
def test_create_charge_and_restart_resumes(path):
    with Ledger(path, epsilon=limit_for(10), delta=DELTA) as led:
        assert led.epsilon_spent() == 0.0 and led.charges() == 0
        receipts = [led.charge(FIXED) for _ in range(3)]
        assert [r.id for r in receipts] == [1, 2, 3]
        assert isinstance(receipts[-1], Receipt)
        spent, curve = led.epsilon_spent(), led.spent_rdp()
        assert receipts[-1].epsilon_spent == spent
        assert receipts[-1].remaining == pytest.approx(led.epsilon - spent)
        assert led.remaining() == receipts[-1].remaining
    assert led.closed
    with pytest.raises(LedgerError, match="closed"):
        led.charge(FIXED)
    # only the ledger file remains next to it (built under a temporary name, then linked)
    assert sorted(os.listdir(os.path.dirname(path))) == ["budget.ledger"]
    with Ledger.open(path) as led:
        assert led.epsilon_spent() == spent and led.spent_rdp() == curve and led.charges() == 3
        assert (led.epsilon, led.delta, led.orders) == (limit_for(10), DELTA, DEFAULT_ORDERS)
        led.charge(FIXED)
    with Ledger(path, epsilon=limit_for(10), delta=DELTA) as led:  # same budget: accepted
        assert led.charges() == 4
        assert led.epsilon_spent() == curve_epsilon(DEFAULT_ORDERS, rows_sum(path)[0], DELTA)


def test_matches_the_accountant_and_history(path):
    acc = RdpAccountant(epsilon=5.0, delta=DELTA)
    with Ledger(path, epsilon=5.0, delta=DELTA) as led:
        for i, sigma in enumerate([6.0, 3.0, 9.0]):
            c = RdpCharge(DEFAULT_ORDERS, tuple(a / (2 * sigma**2) for a in DEFAULT_ORDERS), i + 1, f"c{i}")
            assert led.epsilon_if(c) == acc.epsilon_if(c)
            assert led.can_afford(c) == acc.can_afford(c)
            r = led.charge(c)
            assert r.epsilon_spent == acc.compose(c).epsilon_spent
        assert led.spent_rdp() == acc.spent_rdp()
        assert led.epsilon_spent() == acc.epsilon_spent()
        hist = led.history()
        assert [h.label for h in hist] == ["c0", "c1", "c2"]
        assert [h.count for h in hist] == [1, 2, 3]
        assert [h.id for h in led.history(limit=2)] == [2, 3]
        assert led.history(limit=0) == []
        assert hist[-1].epsilon_after == acc.epsilon_spent()
        assert hist[0].time <= hist[-1].time <= time.time()
        with pytest.raises(ConfigError):
            led.history(limit=-1)


def test_refusal_records_nothing(path):
    with Ledger(path, epsilon=limit_for(2), delta=DELTA) as led:
        led.charge(FIXED)
        led.charge(FIXED)
        spent, curve = led.epsilon_spent(), led.spent_rdp()
        with pytest.raises(BudgetExhausted) as info:
            led.charge(FIXED)
        assert info.value.spent == spent and info.value.limit == led.epsilon
        assert info.value.requested == led.epsilon_if(FIXED) > led.epsilon
        assert "fixed" in str(info.value)
        assert led.spent_rdp() == curve and led.charges() == 2 and len(led.history()) == 2
    assert rows_sum(path) == (curve, 2)


def test_exact_limit_is_accepted(path):
    with Ledger(path, epsilon=limit_for(3), delta=DELTA) as led:
        for _ in range(3):
            led.charge(FIXED)
        assert led.epsilon_spent() == led.epsilon and led.remaining() == 0.0
        assert not led.can_afford(FIXED)


def test_orders_mapping_and_custom_orders(path):
    with Ledger(path, epsilon=20.0, delta=DELTA, orders=(2.0, 8.0)) as led:
        led.charge(RdpCharge((2.0, 3.0), (0.5, 0.1)))  # 8.0 missing -> inf; 3.0 ignored
        assert led.spent_rdp() == (0.5, math.inf)
    with Ledger.open(path) as led:
        assert led.orders == (2.0, 8.0) and led.spent_rdp() == (0.5, math.inf)


def test_file_schema_and_pragmas(path):
    Ledger(path, epsilon=1.0, delta=DELTA).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        fmt, eps, delta, orders, created, version = conn.execute(
            "SELECT format, epsilon, delta, orders, created_at, package_version FROM meta"
        ).fetchone()
        assert (fmt, eps, delta) == (FORMAT, 1.0, DELTA)
        assert tuple(json.loads(orders)) == DEFAULT_ORDERS
        assert created and version
        cols = [r[1] for r in conn.execute("PRAGMA table_info(charges)")]
        assert cols == ["id", "time", "count", "label", "rdp", "epsilon_after", "mechanism", "params"]
        assert conn.execute("SELECT rule FROM meta").fetchone()[0] == "best-order"
    finally:
        conn.close()
    with Ledger.open(path) as led:
        conn = led.store.connection
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_memory_ledger():
    with Ledger(":memory:", epsilon=limit_for(1), delta=DELTA) as led:
        led.charge(FIXED)
        with pytest.raises(BudgetExhausted):
            led.charge(FIXED)
        assert led.charges() == 1
    with pytest.raises(ConfigError):
        Ledger(":memory:")


# --- opening the wrong thing ------------------------------------------------------------------------
def test_missing_file(path):
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger.open(path)
    with pytest.raises(ConfigError):
        Ledger(path)  # a new ledger needs a budget
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(os.path.join(path, "sub", "x.ledger"), epsilon=1.0, delta=DELTA)
    assert not os.path.exists(path)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"hello", b"SQLite format 3\x00" + os.urandom(4080)])
def test_corrupt_file(path, content):
    with open(path, "wb") as f:
        f.write(content)
    for opener in (lambda: Ledger.open(path), lambda: Ledger(path, epsilon=1.0, delta=DELTA)):
        with pytest.raises(LedgerError) as info:
            opener()
        assert str(info.value) == f"not a pmixed ledger (corrupt or foreign file): {path}"
    with open(path, "rb") as f:
        assert f.read() == content  # untouched


def test_corrupted_pages_of_a_real_ledger(path):
    with Ledger(path, epsilon=100.0, delta=DELTA) as led:
        for _ in range(200):
            led.charge(RdpCharge(DEFAULT_ORDERS, (1e-4,) * len(DEFAULT_ORDERS), label="x" * 200))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # smash everything after page 1
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    with pytest.raises(LedgerError, match="corrupt"):
        Ledger.open(path)


def test_directory(tmp_path):
    with pytest.raises(LedgerError, match="directory"):
        Ledger.open(tmp_path)


def test_foreign_sqlite_file(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="foreign"):
        Ledger(path, epsilon=1.0, delta=DELTA)
    # our application_id but not our tables
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="foreign.*missing tables"):
        Ledger.open(path)
    # a newer schema
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="version 99"):
        Ledger.open(path)


def test_budget_mismatch_on_reopen(path):
    Ledger(path, epsilon=2.0, delta=DELTA).close()
    with pytest.raises(LedgerError, match="different budget.*epsilon 3.0 was given, the file has 2.0"):
        Ledger(path, epsilon=3.0, delta=DELTA)
    with pytest.raises(LedgerError, match="delta"):
        Ledger(path, epsilon=2.0, delta=1e-6)
    with pytest.raises(LedgerError, match="orders"):
        Ledger(path, epsilon=2.0, delta=DELTA, orders=(2.0, 4.0))
    with Ledger(path, epsilon=None, delta=None) as led:  # None adopts the file's budget
        assert (led.epsilon, led.delta) == (2.0, DELTA)
    with Ledger(path, epsilon=2.0) as led:
        assert led.delta == DELTA


@pytest.mark.parametrize(
    "tamper",
    [
        "DELETE FROM charges WHERE id = 2",
        "UPDATE totals SET rdp = (SELECT rdp FROM charges WHERE id = 1)",
        "UPDATE charges SET count = 1 WHERE id = 3",
        "UPDATE charges SET rdp = replace(rdp, '0.03125', '0.0') WHERE id = 1",
        "UPDATE totals SET n_charges = 2",
        "UPDATE charges SET epsilon_after = 0.0 WHERE id = 3",
        "DELETE FROM totals",
        "UPDATE meta SET epsilon = 'lots'",
        "UPDATE totals SET rdp = '[1, 2'",
    ],
)
def test_tampering_is_detected_on_open(path, tamper):
    with Ledger(path, epsilon=limit_for(10), delta=DELTA) as led:
        led.charge(FIXED)
        led.charge(FIXED)
        led.charge(RdpCharge(DEFAULT_ORDERS, FIXED.rdp, count=2))
    conn = sqlite3.connect(path)
    conn.execute(tamper)
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="inconsistent|damaged"):
        Ledger.open(path)


def test_overspent_file_is_refused(path):
    with Ledger(path, epsilon=limit_for(3), delta=DELTA) as led:
        for _ in range(3):
            led.charge(FIXED)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET epsilon = ?", (limit_for(2),))
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="above its limit"):
        Ledger.open(path)


@settings(max_examples=40, deadline=None)
@given(
    seq=st.lists(
        st.tuples(st.floats(0.0, 0.5), st.integers(1, 4)),
        max_size=15,
    )
)
def test_property_ledger_agrees_with_accountant(seq):
    orders = (2.0, 8.0, 32.0)
    acc = RdpAccountant(orders, epsilon=4.0, delta=DELTA)
    with Ledger(":memory:", epsilon=4.0, delta=DELTA, orders=orders) as led:
        for scale, count in seq:
            c = RdpCharge(orders, tuple(scale * a for a in orders), count)
            try:
                eps = acc.compose(c).epsilon_spent
            except BudgetExhausted:
                with pytest.raises(BudgetExhausted):
                    led.charge(c)
            else:
                assert led.charge(c).epsilon_spent == eps
            assert led.spent_rdp() == acc.spent_rdp()
        assert led.charges() == acc.charges()
        assert led.epsilon_spent() <= 4.0


# --- concurrency ------------------------------------------------------------------------------------
def _hammer(led: Ledger, attempts: int, out: list) -> None:
    ok = refused = 0
    for _ in range(attempts):
        try:
            led.charge(FIXED)
            ok += 1
        except BudgetExhausted:
            refused += 1
    out.append((ok, refused))


def _process_worker(path: str, attempts: int, threads: int, start, results) -> None:
    start.wait(30)
    with Ledger.open(path) as led:  # threads share one Ledger (and its connection)
        out: list = []
        ts = [threading.Thread(target=_hammer, args=(led, attempts, out)) for _ in range(threads - 1)]
        # ... and one thread uses a connection of its own
        own = Ledger.open(path)
        ts.append(threading.Thread(target=_hammer, args=(own, attempts, out)))
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        own.close()
    results.put(out)


def test_threads_with_own_connections_never_overspend(path):
    K = 13
    Ledger(path, epsilon=limit_for(K), delta=DELTA).close()
    out: list = []
    leds = [Ledger.open(path) for _ in range(4)]
    ts = [threading.Thread(target=_hammer, args=(led, 8, out)) for led in leds]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for led in leds:
        led.close()
    assert sum(ok for ok, _ in out) == K
    assert sum(r for _, r in out) == 4 * 8 - K
    assert rows_sum(path)[1] == K


def test_processes_and_threads_never_overspend(path):
    K, procs, threads, attempts = 20, 4, 2, 6
    Ledger(path, epsilon=limit_for(K), delta=DELTA).close()
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_process_worker, args=(path, attempts, threads, start, results)) for _ in range(procs)]
    for p in ps:
        p.start()
    start.set()
    outs = [results.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(30)
        assert p.exitcode == 0
    counts = [c for out in outs for c in out]
    assert len(counts) == procs * threads
    assert sum(ok for ok, _ in counts) == K
    assert sum(r for _, r in counts) == procs * threads * attempts - K
    curve, n = rows_sum(path)  # totals == sum of the accepted rows
    assert n == K
    with Ledger.open(path) as led:
        assert led.charges() == K
        assert led.epsilon_spent() == led.epsilon == curve_epsilon(DEFAULT_ORDERS, curve, DELTA)
        with pytest.raises(BudgetExhausted):
            led.charge(FIXED)


# --- crashes -----------------------------------------------------------------------------------------
def _crash_after_commit(path: str, committed) -> None:
    led = Ledger.open(path)
    led.charge(RdpCharge(DEFAULT_ORDERS, FIXED.rdp, label="durable"))
    committed.set()  # charge() returned: the commit is durable; "release" would come next
    time.sleep(60)


def _crash_before_commit(path: str, inside) -> None:
    led = Ledger.open(path)
    commit = SqliteLedgerStore.commit

    def stalled_commit(store):  # inside the transaction: row inserted, totals updated, not committed
        assert store.connection.in_transaction
        inside.set()
        time.sleep(60)
        commit(store)

    SqliteLedgerStore.commit = stalled_commit  # this child process only
    led.charge(RdpCharge(DEFAULT_ORDERS, FIXED.rdp, label="partial"))


def _run_and_kill(target, path: str) -> None:
    ctx = mp.get_context("spawn")
    ev = ctx.Event()
    p = ctx.Process(target=target, args=(path, ev))
    p.start()
    try:
        assert ev.wait(60), "child never reached the crash point"
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
    finally:
        if p.is_alive():
            p.kill()


def test_sigkill_after_commit_keeps_the_charge(path):
    with Ledger(path, epsilon=limit_for(5), delta=DELTA) as led:
        led.charge(FIXED)
    _run_and_kill(_crash_after_commit, path)
    with Ledger.open(path) as led:
        assert led.charges() == 2
        assert [h.label for h in led.history()] == ["fixed", "durable"]
        assert led.spent_rdp() == rows_sum(path)[0]


def test_sigkill_mid_transaction_leaves_no_partial_charge(path):
    with Ledger(path, epsilon=limit_for(5), delta=DELTA) as led:
        led.charge(FIXED)
        spent = led.epsilon_spent()
    _run_and_kill(_crash_before_commit, path)
    with Ledger.open(path) as led:  # opens (lock released by the kernel), verifies
        assert led.charges() == 1 and led.epsilon_spent() == spent
        assert [h.label for h in led.history()] == ["fixed"]
        led.charge(FIXED)  # and the write lock is free again
        assert led.charges() == 2
    assert rows_sum(path)[1] == 2


def _open_close(path: str) -> None:
    Ledger.open(path).close()


def _count_charges(path: str, results) -> None:
    with Ledger.open(path) as led:
        results.put(led.charges())


def test_second_open_in_a_process_keeps_the_first_ones_locks(path):
    """Regression: opening the file with open() (e.g. to sniff its header) while a Ledger of the
    same process holds it cancels that Ledger's POSIX locks; another process closing its last
    connection then deletes the WAL under it and later charges are lost (overspend)."""
    Ledger(path, epsilon=limit_for(10), delta=DELTA).close()
    ctx = mp.get_context("spawn")
    led1 = Ledger.open(path)
    try:
        led1.charge(FIXED)
        Ledger.open(path).close()  # a second Ledger in this process
        p = ctx.Process(target=_open_close, args=(path,))  # another process comes and goes
        p.start()
        p.join(60)
        assert p.exitcode == 0
        led1.charge(FIXED)
        led1.charge(FIXED)
        results = ctx.Queue()
        p = ctx.Process(target=_count_charges, args=(path, results))
        p.start()
        seen = results.get(timeout=60)
        p.join(60)
        assert seen == 3, "charges committed by this process are invisible to others"
    finally:
        led1.close()
    assert rows_sum(path)[1] == 3
