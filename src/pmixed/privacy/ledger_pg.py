"""The PostgreSQL ledger store: several budgets per database, shared by processes on many machines.

Selected by a URL (``Ledger("postgresql://user@host:5432/db?budget=NAME", ...)``): the URL is a
libpq connection URI (``postgresql://`` or ``postgres://``; any libpq parameter may follow in the
query string, e.g. ``sslmode=require``) plus ``budget=NAME`` (default ``default``), the name of the
budget in that database, and optionally ``schema=NAME`` (default ``pmixed_ledger``; lower-case
letters, digits and ``_``), the schema holding the ledger's tables. One database holds any number
of budgets, keyed by name.

A charge is one transaction (:meth:`PostgresLedgerStore.lock_totals` .. ``commit``)::

    BEGIN;
    SELECT rdp, n_charges, last_charge_id FROM totals WHERE budget = $1 FOR UPDATE;  -- row lock
    -- the policy decides on the locked totals (privacy/ledger.py)
    INSERT INTO charges (...);  UPDATE totals SET ... WHERE budget = $1;
    COMMIT;   -- synchronous_commit = on: returns once the commit record is flushed to disk

The row lock serialises writers of one budget across every connection (process, machine);
readers are never blocked. A writer waits at most 30 s for the lock (``lock_timeout``), and a
session idle inside its transaction for 60 s is ended by the server, releasing the lock. Every session sets ``synchronous_commit = on`` (whatever the server's
default), and a server running with ``fsync = off`` is refused on open (its commits would not be
durable). A connection lost during ``COMMIT`` leaves the outcome unknown: :class:`LedgerError`
is raised and the caller must not release (the charge may have been recorded: budget wasted,
never an uncharged release). A broken connection is replaced on the next transaction.

Schema ``pmixed_ledger`` (or the URL's ``schema=``; created on first use under a transaction-scoped advisory lock, so two
processes creating it at once are safe; budgets are created with ``INSERT ... ON CONFLICT DO
NOTHING``, so two creators of one budget agree on the first one)::

    format  (id=1, format, schema_version)                 -- marks the schema as a pmixed ledger
    budgets (name PK, epsilon, delta, orders JSON, rule, created_at, package_version)
    charges ((budget, id) PK, time, count, label, rdp JSON, epsilon_after, mechanism, params JSON)
    totals  (budget PK, rdp JSON, n_charges, last_charge_id)

Charge ids count from 1 per budget. RDP curves are stored as JSON text with ``null`` for inf,
like the SQLite store (exact float round trip). Opening checks the format row and the budget's
rows; the policy then replays the history against the totals.

psycopg (3) is imported lazily, when a store is opened, so ``import pmixed.privacy`` stays light;
install it with the ``postgres`` extra (``pip install 'pmixed[postgres]'``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pmixed.errors import ConfigError, LedgerError
from pmixed.privacy.accountant import ChargeRecord, check_limit, dump_params
from pmixed.privacy.ledger_store import (
    LedgerMeta,
    NewCharge,
    Totals,
    charge_records,
    dump_curve,
    totals_from_row,
)

__all__ = ["FORMAT", "SCHEMA", "SCHEMA_VERSION", "PostgresLedgerStore", "is_postgres_url", "parse_url"]

FORMAT = "pmixed-ledger-pg/1"
SCHEMA_VERSION = 1
SCHEMA = "pmixed_ledger"  # the default schema
DEFAULT_BUDGET = "default"
LOCK_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10
IDLE_IN_TRANSACTION_S = 60.0
#: pg_advisory_xact_lock key serialising schema creation: b"PMXD" as an integer.
_CREATE_LOCK = 0x504D5844

_SCHEMES = ("postgresql://", "postgres://")
_CHARGE_COLUMNS = "id, time, count, label, rdp, epsilon_after, mechanism, params"

_DDL = """
CREATE SCHEMA IF NOT EXISTS @S@;
CREATE TABLE IF NOT EXISTS @S@.format (
    id             integer PRIMARY KEY CHECK (id = 1),
    format         text    NOT NULL,
    schema_version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS @S@.budgets (
    name            text             PRIMARY KEY,
    epsilon         double precision NOT NULL,
    delta           double precision NOT NULL,
    orders          text             NOT NULL,
    rule            text             NOT NULL,
    created_at      text             NOT NULL,
    package_version text             NOT NULL
);
CREATE TABLE IF NOT EXISTS @S@.charges (
    budget        text             NOT NULL REFERENCES @S@.budgets (name),
    id            bigint           NOT NULL CHECK (id >= 1),
    time          double precision NOT NULL,
    count         bigint           NOT NULL CHECK (count >= 1),
    label         text             NOT NULL,
    rdp           text             NOT NULL,
    epsilon_after double precision NOT NULL,
    mechanism     text             NOT NULL DEFAULT '',
    params        text             NOT NULL DEFAULT '{}',
    PRIMARY KEY (budget, id)
);
CREATE TABLE IF NOT EXISTS @S@.totals (
    budget         text   PRIMARY KEY REFERENCES @S@.budgets (name),
    rdp            text   NOT NULL,
    n_charges      bigint NOT NULL,
    last_charge_id bigint NOT NULL
);
"""

#: Connections of stores inherited across fork: kept referenced, never closed by the child (a
#: close would end the parent's session on the shared socket).
_ABANDONED: list[Any] = []


def is_postgres_url(where: object) -> bool:
    """True for a ``postgresql://`` / ``postgres://`` URL (a string)."""
    return isinstance(where, str) and where.startswith(_SCHEMES)


def parse_url(url: str) -> tuple[str, str, str, str]:
    """``(conninfo, budget, schema, location)``: the libpq URI without ``budget`` and ``schema``,
    the budget's name, the schema's, and the URL without its password (for messages)."""
    if not is_postgres_url(url):
        raise ConfigError("ledger", f"a PostgreSQL ledger URL starts with postgresql://, got {url!r}")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    budgets = [v for k, v in query if k == "budget"]
    if len(budgets) > 1:
        raise ConfigError("ledger", f"the URL names several budgets: {budgets}")
    budget = budgets[0] if budgets else DEFAULT_BUDGET
    if not budget or len(budget) > 200 or not budget.isprintable():
        raise ConfigError("ledger", f"budget= must be a non-empty printable name, got {budget!r}")
    schemas = [v for k, v in query if k == "schema"]
    schema = schemas[-1] if schemas else SCHEMA
    if len(schemas) > 1 or not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ConfigError("ledger", f"schema= must be one lower-case SQL identifier, got {schemas}")
    rest = [(k, v) for k, v in query if k not in ("budget", "schema")]
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + "@" + host
    shown = [(k, v) for k, v in rest if k.lower() != "password"]
    shown += ([("schema", schema)] if schema != SCHEMA else []) + [("budget", budget)]
    location = urlunsplit((parts.scheme, netloc, parts.path, urlencode(shown), ""))
    return conninfo, budget, schema, location


def _psycopg():
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - the postgres extra is part of dev
        raise LedgerError(
            "a postgresql:// ledger needs psycopg 3: pip install 'pmixed[postgres]'"
        ) from e
    return psycopg




class PostgresLedgerStore:
    """A :class:`~pmixed.privacy.ledger_store.LedgerStore` for one budget of a PostgreSQL
    database. ``PostgresLedgerStore(url, new)`` opens the budget named in ``url``; if there is
    none and ``new`` is given, it creates it for the budget ``new()`` returns (and the schema, if
    the database has none). Not thread-safe by itself: the policy serialises its calls."""

    def __init__(self, url: str, new: Callable[[], LedgerMeta] | None = None):
        self._conninfo, self.budget, self.schema, self.location = parse_url(url)
        self._psycopg = _psycopg()
        self._conn = None
        self._locked: Totals | None = None
        self._conn = self._connect()
        try:
            self._check_durable()
            self._ensure_budget(new)
            self.meta = self._read_meta()
        except BaseException:
            self.close()
            raise

    @classmethod
    def opener(cls, url: str) -> Callable[[Callable[[], LedgerMeta] | None], PostgresLedgerStore]:
        """A :data:`~pmixed.privacy.ledger_store.StoreOpener` for ``url``."""
        parse_url(url)  # a bad URL fails before anything is opened
        return lambda new: cls(url, new)

    # -- connections ----------------------------------------------------------------------------
    def _connect(self):
        pg = self._psycopg
        try:
            conn = pg.connect(self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except pg.Error as e:
            raise LedgerError(f"cannot connect to ledger {self.location}: {_one_line(e)}") from e
        try:
            conn.execute("SET synchronous_commit = on")
            conn.execute(f"SET lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'")
            # a client that stalls (or is cut off) holding the row lock loses its session, so
            # it cannot block the budget; its commit then fails and it releases nothing
            conn.execute(f"SET idle_in_transaction_session_timeout = '{int(IDLE_IN_TRANSACTION_S * 1000)}ms'")
        except pg.Error as e:
            conn.close()
            raise LedgerError(f"cannot set up a session on ledger {self.location}: {_one_line(e)}") from e
        return conn

    def _db(self):
        if self._conn is None:
            raise LedgerError(f"ledger {self.location} is closed")
        return self._conn

    def _fresh(self):
        """The connection, replaced first if it broke (server restart, network): only between
        transactions."""
        conn = self._db()
        if conn.broken or conn.closed:
            try:
                conn.close()
            except Exception:
                pass
            self._conn = None
            self._conn = conn = self._connect()
        return conn

    def _check_durable(self) -> None:
        pg = self._psycopg
        try:
            fsync = self._db().execute("SHOW fsync").fetchone()[0]
        except pg.Error as e:
            raise LedgerError(f"cannot read ledger {self.location}: {_one_line(e)}") from e
        if str(fsync).lower() != "on":
            raise LedgerError(
                f"ledger {self.location}: the PostgreSQL server runs with fsync={fsync}, so a "
                f"commit is not durable; a ledger needs fsync=on"
            )

    # -- creation and opening -------------------------------------------------------------------
    def _schema_state(self, conn) -> str:
        """'absent', 'ours' or a description of what is wrong."""
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (self.schema,)
            ).fetchall()
        }
        schema = conn.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (self.schema,)
        ).fetchone()
        if schema is None and not tables:
            return "absent"
        missing = {"format", "budgets", "charges", "totals"} - tables
        if missing:
            if not tables:
                return "absent"  # an empty schema (a creator rolled back, or made by hand)
            return f"schema {self.schema} lacks the tables {sorted(missing)}"
        rows = conn.execute(f"SELECT format, schema_version FROM {self.schema}.format").fetchall()
        if len(rows) != 1:
            return f"{self.schema}.format holds {len(rows)} rows"
        fmt, version = rows[0]
        if fmt != FORMAT:
            return f"format {fmt!r}, expected {FORMAT!r}"
        if version != SCHEMA_VERSION:
            return f"schema version {version} (this pmixed reads version {SCHEMA_VERSION})"
        return "ours"

    def _foreign(self, why: str) -> LedgerError:
        return LedgerError(
            f"{self.location} is not a pmixed ledger database (foreign or damaged schema "
            f"{self.schema}: {why})"
        )

    def _ensure_budget(self, new: Callable[[], LedgerMeta] | None) -> None:
        pg = self._psycopg
        conn = self._db()
        try:
            state = self._schema_state(conn)
            if state not in ("absent", "ours"):
                raise self._foreign(state)
            if state == "ours":
                row = conn.execute(
                    f"SELECT 1 FROM {self.schema}.budgets WHERE name = %s", (self.budget,)
                ).fetchone()
                if row is not None:
                    return
            if new is None:
                raise LedgerError(f"no ledger at {self.location} (no budget {self.budget!r} in the database)")
            meta = new()
            with conn.transaction():
                # Creators take turns: CREATE ... IF NOT EXISTS is not safe against a concurrent
                # creator of the same name (it can fail on pg_type's unique index).
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
                state = self._schema_state(conn)
                if state == "absent":
                    conn.execute(_DDL.replace("@S@", self.schema))
                    conn.execute(
                        f"INSERT INTO {self.schema}.format (id, format, schema_version) VALUES (1, %s, %s)",
                        (FORMAT, SCHEMA_VERSION),
                    )
                elif state != "ours":
                    raise self._foreign(state)
                cur = conn.execute(
                    f"INSERT INTO {self.schema}.budgets (name, epsilon, delta, orders, rule, created_at, package_version) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                    (
                        self.budget, meta.epsilon, meta.delta, json.dumps(list(meta.orders)), meta.rule,
                        meta.created_at, meta.package_version,
                    ),
                )
                if cur.rowcount == 1:
                    conn.execute(
                        f"INSERT INTO {self.schema}.totals (budget, rdp, n_charges, last_charge_id) VALUES (%s, %s, 0, 0)",
                        (self.budget, dump_curve((0.0,) * len(meta.orders))),
                    )
        except pg.Error as e:
            raise LedgerError(f"cannot open ledger {self.location}: {_one_line(e)}") from e

    def _read_meta(self) -> LedgerMeta:
        pg = self._psycopg
        try:
            row = self._db().execute(
                f"SELECT epsilon, delta, orders, created_at, package_version, rule FROM {self.schema}.budgets "
                "WHERE name = %s",
                (self.budget,),
            ).fetchone()
        except pg.Error as e:
            raise LedgerError(f"cannot read ledger {self.location}: {_one_line(e)}") from e
        if row is None:
            raise LedgerError(f"no ledger at {self.location} (no budget {self.budget!r} in the database)")
        f_eps, f_delta, f_orders, created_at, pkg_version, rule = row
        return LedgerMeta.from_row(self.location, "its budget row", f_eps, f_delta, f_orders, rule, created_at,
                                   pkg_version)

    # -- the store protocol -----------------------------------------------------------------------
    @property
    def connection(self):
        """The psycopg connection (for inspection; do not write through it)."""
        return self._db()

    def _n(self) -> int:
        return len(self.meta.orders)

    def _totals_row(self, conn, lock: bool = False) -> Totals:
        sql = f"SELECT rdp, n_charges, last_charge_id FROM {self.schema}.totals WHERE budget = %s"
        row = conn.execute(sql + (" FOR UPDATE" if lock else ""), (self.budget,)).fetchone()
        return totals_from_row(row, self._n(), self.location)

    def read_totals(self) -> Totals:
        pg = self._psycopg
        try:
            return self._totals_row(self._fresh())
        except pg.Error as e:
            raise LedgerError(f"cannot read ledger {self.location}: {_one_line(e)}") from e

    def lock_totals(self) -> Totals:
        pg = self._psycopg
        conn = self._fresh()
        try:
            conn.execute("BEGIN")
            self._locked = self._totals_row(conn, lock=True)  # the row lock, across connections
        except BaseException as exc:
            self.rollback()
            if isinstance(exc, pg.Error):
                raise LedgerError(f"cannot lock ledger {self.location} for writing: {_one_line(exc)}") from exc
            raise
        return self._locked

    def append(self, charge: NewCharge, spent_after: tuple[float, ...]) -> int:
        pg = self._psycopg
        conn = self._db()
        locked = self._locked
        if locked is None or conn.info.transaction_status != pg.pq.TransactionStatus.INTRANS:
            raise LedgerError(f"ledger {self.location}: append() outside lock_totals()")
        charge_id = locked.last_charge_id + 1
        try:
            conn.execute(
                f"INSERT INTO {self.schema}.charges (budget, {_CHARGE_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    self.budget, charge_id, charge.time, charge.count, charge.label,
                    dump_curve(charge.rdp), charge.epsilon_after, charge.mechanism,
                    dump_params(charge.params),
                ),
            )
            conn.execute(
                f"UPDATE {self.schema}.totals SET rdp = %s, n_charges = %s, last_charge_id = %s WHERE budget = %s",
                (dump_curve(spent_after), locked.n_charges + 1, charge_id, self.budget),
            )
        except pg.Error as e:
            raise LedgerError(f"charge not recorded in ledger {self.location}: {_one_line(e)}") from e
        return charge_id

    def commit(self) -> None:
        pg = self._psycopg
        conn = self._db()
        try:
            conn.execute("COMMIT")
        except pg.Error as e:
            raise LedgerError(
                f"charge not confirmed by ledger {self.location} (do not release): {_one_line(e)}"
            ) from e
        finally:
            self._locked = None

    def rollback(self) -> None:
        self._locked = None
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except Exception:
            pass

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        check_limit(limit)
        pg = self._psycopg
        sql = f"SELECT {_CHARGE_COLUMNS} FROM {self.schema}.charges WHERE budget = %s ORDER BY id DESC"
        args: tuple = (self.budget,)
        if limit is not None:
            sql += " LIMIT %s"
            args = (self.budget, limit)
        try:
            rows = self._fresh().execute(sql, args).fetchall()
        except pg.Error as e:
            raise LedgerError(f"cannot read ledger {self.location}: {_one_line(e)}") from e
        return charge_records(reversed(rows), self._n(), self.location)

    def snapshot(self) -> tuple[Totals, list[ChargeRecord]]:
        pg = self._psycopg
        conn = self._fresh()
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                totals = self._totals_row(conn)
                rows = conn.execute(
                    f"SELECT {_CHARGE_COLUMNS} FROM {self.schema}.charges WHERE budget = %s ORDER BY id",
                    (self.budget,),
                ).fetchall()
        except pg.Error as e:
            raise LedgerError(f"cannot read ledger {self.location}: {_one_line(e)}") from e
        return totals, charge_records(rows, self._n(), self.location)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._locked = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def abandon(self) -> None:
        """Forget the connection without closing it (after a fork: the parent's session)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _ABANDONED.append(conn)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
