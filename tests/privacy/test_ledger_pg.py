"""The PostgreSQL ledger store (privacy/ledger_pg.py) against a real server: the shared policy
tests (tests/privacy/test_ledger_stores.py's class) over it, then what is PostgreSQL's own: the
URL, several budgets per database, durable commits, the row lock across processes, race-safe
creation, and a corrupt, foreign or tampered database refused on open with one clear line."""

from __future__ import annotations

import multiprocessing as mp
import sys

import pytest

from pmixed.errors import BudgetExhausted, ConfigError, LedgerError
from pmixed.privacy.accountant import DEFAULT_ORDERS, RdpCharge
from pmixed.privacy.ledger import Ledger
from pmixed.privacy.ledger_pg import SCHEMA, PostgresLedgerStore, is_postgres_url, parse_url

from . import test_ledger_stores as shared
from .pg import admin, budget_url, fresh_schema, with_params

DELTA = shared.DELTA
FIXED = shared.FIXED
limit_for = shared.limit_for


@pytest.fixture
def where():
    """A fresh budget on the test server (the shared class's fixture, for PostgreSQL)."""
    return budget_url()


class TestPolicyOverPostgres(shared.TestPolicyOverAnyStore):
    """Every policy test of the SQLite store and the in-memory fake, over PostgreSQL."""


# --- the URL -------------------------------------------------------------------------------------
def test_url_parsing_keeps_libpq_parameters_and_hides_the_password():
    conninfo, budget, schema, location = parse_url(
        "postgresql://alice:s3cret@db.example:5433/ledgers?sslmode=require&budget=prod&password=x"
    )
    assert (budget, schema) == ("prod", SCHEMA)
    assert conninfo == "postgresql://alice:s3cret@db.example:5433/ledgers?sslmode=require&password=x"
    assert "s3cret" not in location and "password" not in location
    assert location == "postgresql://alice@db.example:5433/ledgers?sslmode=require&budget=prod"
    assert parse_url("postgres://h/db")[1:3] == ("default", SCHEMA)
    assert parse_url("postgresql://h/db?schema=mine&budget=a")[1:3] == ("a", "mine")
    assert is_postgres_url("postgresql://h/db") and not is_postgres_url("budget.ledger")
    for bad in ("postgresql://h/db?budget=a&budget=b", "postgresql://h/db?budget=",
                "postgresql://h/db?schema=Robert'); DROP TABLE x;--"):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_no_server_is_one_clear_line():
    with pytest.raises(LedgerError, match=r"^cannot connect to ledger postgresql://nobody@127\.0\.0\.1:1/x\?connect_timeout=2&budget=b: ") as e:
        Ledger("postgresql://nobody:pw@127.0.0.1:1/x?budget=b&connect_timeout=2", epsilon=1.0, delta=DELTA)
    assert "\n" not in str(e.value) and "pw" not in str(e.value)


# --- the store -----------------------------------------------------------------------------------
def test_the_url_selects_the_postgres_store_and_commits_are_durable():
    url = budget_url()
    with Ledger(url, epsilon=limit_for(5), delta=DELTA) as led:
        assert isinstance(led.store, PostgresLedgerStore)
        assert led.path == parse_url(url)[3]
        conn = led.store.connection
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert conn.execute("SHOW fsync").fetchone()[0] == "on"
        led.charge(FIXED)
    # a session default of synchronous_commit=off (libpq options) is overridden by the store
    off = with_params(url, options="-csynchronous_commit%3Doff")
    with Ledger.open(off) as led:
        assert led.store.connection.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert led.charges() == 1


def test_several_budgets_per_database_are_independent():
    a, b = budget_url(), budget_url()
    with Ledger(a, epsilon=limit_for(2), delta=DELTA) as la, Ledger(b, epsilon=limit_for(3), delta=DELTA) as lb:
        la.charge(FIXED)
        la.charge(FIXED)
        with pytest.raises(BudgetExhausted):
            la.charge(FIXED)
        for _ in range(3):
            lb.charge(FIXED)
        assert [r.id for r in lb.history()] == [1, 2, 3]  # ids count per budget
        assert (la.charges(), lb.charges()) == (2, 3)
    with Ledger.open(a) as la:
        assert la.epsilon == limit_for(2) and la.charges() == 2


def test_open_only_needs_an_existing_budget():
    url = budget_url()
    with pytest.raises(LedgerError, match="no ledger at .*no budget 'test-"):
        Ledger.open(url)
    with pytest.raises(ConfigError, match="a new ledger needs a budget"):
        Ledger(url)


def _open_and_charge(url: str, barrier, out) -> None:
    try:
        barrier.wait(60)
        with Ledger(url, epsilon=limit_for(20), delta=DELTA) as led:
            led.charge(FIXED)
            out.put(("ok", led.created_at))
    except BaseException as e:  # reported to the parent
        out.put(("error", repr(e)))


def test_creation_is_race_safe_across_processes():
    """Four processes create the same schema and budget at the same moment: all succeed, one
    budget exists, and every charge is in it."""
    url = budget_url(schema=fresh_schema())
    ctx = mp.get_context("spawn")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_and_charge, args=(url, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(60)
    assert all(r[0] == "ok" for r in results), results
    assert len({r[1] for r in results}) == 1
    with Ledger.open(url) as led:
        assert led.charges() == n


def _hammer(url: str, rounds: int, out) -> None:
    ok = 0
    with Ledger.open(url) as led:
        for _ in range(rounds):
            try:
                led.charge(FIXED)
                ok += 1
            except BudgetExhausted:
                pass
    out.put(ok)


def test_processes_never_overspend():
    K = 25
    url = budget_url()
    Ledger(url, epsilon=limit_for(K), delta=DELTA).close()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(url, 20, out)) for _ in range(3)]
    for p in procs:
        p.start()
    oks = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert sum(oks) == K
    with Ledger.open(url) as led:
        assert led.charges() == K and led.queries_left(FIXED.rdp) == 0


def test_a_broken_connection_refuses_then_reconnects():
    url = budget_url()
    with Ledger(url, epsilon=limit_for(5), delta=DELTA) as led, admin() as other:
        led.charge(FIXED)
        pid = led.store.connection.info.backend_pid
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(LedgerError, match="cannot lock ledger"):
            led.charge(FIXED)  # nothing recorded, nothing to release
        led.charge(FIXED)  # a new connection
        assert led.charges() == 2 and [r.id for r in led.history()] == [1, 2]


# --- damage --------------------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("UPDATE {s}.totals SET n_charges = n_charges + 1 WHERE budget = %s", "inconsistent"),
        ("UPDATE {s}.charges SET rdp = replace(rdp, '0.03125', '0.01') WHERE budget = %s", "inconsistent"),
        ("DELETE FROM {s}.charges WHERE budget = %s AND id = 2", "inconsistent"),
        ("UPDATE {s}.charges SET epsilon_after = 0.5 WHERE budget = %s AND id = 3", "inconsistent"),
        ("UPDATE {s}.totals SET rdp = '[1, 2' WHERE budget = %s", "damaged: bad totals"),
        ("DELETE FROM {s}.totals WHERE budget = %s", "totals row is missing"),
        ("UPDATE {s}.budgets SET orders = 'x' WHERE name = %s", "damaged: bad orders"),
        ("UPDATE {s}.budgets SET epsilon = -1 WHERE name = %s", "damaged: bad budget"),
    ],
)
def test_tampering_is_detected_on_open(tamper, message):
    schema = fresh_schema()
    url = budget_url(schema=schema)
    budget = parse_url(url)[1]
    with Ledger(url, epsilon=limit_for(5), delta=DELTA) as led:
        for _ in range(3):
            led.charge(FIXED)
    with admin() as conn:
        conn.execute(tamper.format(s=schema), (budget,))
    with pytest.raises(LedgerError, match=message) as e:
        Ledger.open(url)
    _one_line(e)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("CREATE TABLE {s}.budgets (x int)", r"lacks the tables \['charges', 'format', 'totals'\]"),
        (
            "CREATE TABLE {s}.format (id int, format text, schema_version int);"
            "CREATE TABLE {s}.budgets (x int); CREATE TABLE {s}.charges (x int); CREATE TABLE {s}.totals (x int);"
            "INSERT INTO {s}.format VALUES (1, 'someone-else/3', 1)",
            "format 'someone-else/3'",
        ),
        (
            "CREATE TABLE {s}.format (id int, format text, schema_version int);"
            "CREATE TABLE {s}.budgets (x int); CREATE TABLE {s}.charges (x int); CREATE TABLE {s}.totals (x int);"
            "INSERT INTO {s}.format VALUES (1, 'pmixed-ledger-pg/1', 9)",
            "schema version 9",
        ),
    ],
)
def test_a_foreign_schema_is_refused(setup, message):
    schema = fresh_schema()
    with admin() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(setup.format(s=schema))
    url = budget_url(schema=schema)
    for open_ in (lambda: Ledger(url, epsilon=1.0, delta=DELTA), lambda: Ledger.open(url)):
        with pytest.raises(LedgerError, match=f"is not a pmixed ledger database .*{message}") as e:
            open_()
        _one_line(e)


def test_a_budget_created_for_another_budget_is_refused():
    url = budget_url()
    Ledger(url, epsilon=2.0, delta=DELTA).close()
    with pytest.raises(LedgerError, match="different budget: epsilon 3.0 was given, the file has 2.0") as e:
        Ledger(url, epsilon=3.0, delta=DELTA)
    _one_line(e)


def test_the_postgres_module_does_not_load_psycopg_on_import():
    import subprocess

    code = "import sys, pmixed.privacy.ledger, pmixed.privacy.ledger_pg; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_charges_record_what_they_were():
    url = budget_url()
    c = RdpCharge(DEFAULT_ORDERS, FIXED.rdp, 2, "gauss", "gaussian", {"sigma": 4.0, "sensitivity": 1})
    with Ledger(url, epsilon=50.0, delta=DELTA) as led:
        led.charge(c)
    with Ledger.open(url) as led:
        (h,) = led.history()
        assert (h.count, h.label, h.mechanism, h.params, h.rdp) == (2, "gauss", "gaussian", c.params, c.rdp)
