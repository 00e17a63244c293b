"""The SQLite ledger store: one budget per file, WAL journal, every commit fsync'd.

:meth:`SqliteLedgerStore.lock_totals` opens a ``BEGIN IMMEDIATE`` transaction: SQLite's write
lock, which serialises charges across processes, and a read of the latest committed totals under
it. ``synchronous=FULL`` makes :meth:`~SqliteLedgerStore.commit` durable (fsync) before it
returns. A crash before the commit records nothing; re-opening resumes the committed totals.

Keep the file on a local filesystem: WAL needs shared memory between the processes that use the
file, which network filesystems (NFS, SMB, ...) do not provide (sqlite.org/wal.html), so two
machines could both take the write lock and overspend.

Do not open the ledger file with ``open()`` (or copy it with tools that do) in a process that
holds a store on it: closing such a descriptor cancels SQLite's POSIX locks for the whole process,
which can let another process delete the WAL under it (lost charges). Copy a live ledger with
SQLite's backup API or ``VACUUM INTO`` instead.

Creation: the file is built under a temporary name, fsync'd, then hard-linked into place, which is
atomic and fails if someone else created it meanwhile. Where hard links are not available, the
creators agree through a claim file ``.<name>.creating`` made with ``O_CREAT | O_EXCL``: the holder
renames its file into place only if the path is still free, then removes the claim; the others wait
for the claim to go and open the winner's ledger. A claim left behind by a crash (the window is a
rename and an fsync long) makes later creators fail with a message that names it.

Schema (``PRAGMA application_id`` = :data:`APPLICATION_ID`, ``PRAGMA user_version`` =
:data:`SCHEMA_VERSION`)::

    meta    (id=1, format, epsilon, delta, orders JSON, created_at, package_version, rule)
    charges (id AUTOINCREMENT, time, count, label, rdp JSON per ledger order, epsilon_after,
             mechanism, params JSON)
    totals  (id=1, rdp JSON: sum over charges of count*rdp per order, n_charges, last_charge_id)

RDP values are stored as JSON lists of numbers with ``null`` for inf. Version 1 files (no rule,
mechanism or params columns) are upgraded in place on open, in one transaction: their rule is
"best-order" (the only rule version 1 had) and their charges get an empty mechanism.

A ``":memory:"`` path gives a private, non-durable ledger (tests).

Pure standard library (sqlite3).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable

from pmixed.errors import LedgerError
from pmixed.privacy.accountant import ChargeRecord, check_limit, dump_params
from pmixed.privacy.ledger_store import (
    LedgerMeta,
    NewCharge,
    Totals,
    charge_records,
    dump_curve,
    totals_from_row,
)

__all__ = ["APPLICATION_ID", "FORMAT", "MEMORY", "SCHEMA_VERSION", "SqliteLedgerStore"]

FORMAT = "pmixed-ledger/1"
#: ``PRAGMA application_id`` of a pmixed ledger: b"PMXD" as a big-endian 32-bit integer.
APPLICATION_ID = 0x504D5844
#: 2: meta.rule, charges.mechanism and charges.params. Version 1 files are upgraded on open.
SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 30.0
#: How long a creator waits for another creator's claim (filesystems without hard links).
CLAIM_TIMEOUT_S = 30.0
MEMORY = ":memory:"
_V1_RULE = "best-order"

_SCHEMA = """
CREATE TABLE meta (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    format          TEXT    NOT NULL,
    epsilon         REAL    NOT NULL,
    delta           REAL    NOT NULL,
    orders          TEXT    NOT NULL,
    created_at      TEXT    NOT NULL,
    package_version TEXT    NOT NULL,
    rule            TEXT    NOT NULL
);
CREATE TABLE charges (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          REAL    NOT NULL,
    count         INTEGER NOT NULL CHECK (count >= 1),
    label         TEXT    NOT NULL,
    rdp           TEXT    NOT NULL,
    epsilon_after REAL    NOT NULL,
    mechanism     TEXT    NOT NULL DEFAULT '',
    params        TEXT    NOT NULL DEFAULT '{}'
);
CREATE TABLE totals (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    rdp            TEXT    NOT NULL,
    n_charges      INTEGER NOT NULL,
    last_charge_id INTEGER NOT NULL
);
"""

_UPGRADE_FROM_1 = (
    f"ALTER TABLE meta ADD COLUMN rule TEXT NOT NULL DEFAULT '{_V1_RULE}'",
    "ALTER TABLE charges ADD COLUMN mechanism TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE charges ADD COLUMN params TEXT NOT NULL DEFAULT '{}'",
)

_CHARGE_COLUMNS = "id, time, count, label, rdp, epsilon_after, mechanism, params"


def _package_version() -> str:
    # importlib.metadata rather than ``pmixed.__version__``: importing the root package would
    # give pmixed.privacy an (indirect) import path to the torch-backed mechanism.
    try:
        from importlib.metadata import version

        return version("pmixed")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def new_meta(epsilon: float, delta: float, orders: tuple[float, ...], rule: str) -> LedgerMeta:
    """The meta of a budget created now by this pmixed."""
    return LedgerMeta(
        epsilon, delta, tuple(orders), rule,
        _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), _package_version(),
    )




def _not_ledger(path: str) -> LedgerError:
    return LedgerError(f"not a pmixed ledger (corrupt or foreign file): {path}")


def _connect(target: str) -> sqlite3.Connection:
    conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class SqliteLedgerStore:
    """A :class:`~pmixed.privacy.ledger_store.LedgerStore` in one SQLite file (or ``":memory:"``).

    ``SqliteLedgerStore(path, new)`` opens the ledger at ``path``; if there is none and ``new`` is
    given, it creates one for the budget ``new()`` returns first. Not thread-safe by itself: the
    policy (:class:`~pmixed.privacy.ledger.Ledger`) serialises its calls.
    """

    def __init__(self, path: str | os.PathLike[str], new: Callable[[], LedgerMeta] | None = None):
        self.location = os.fspath(path)
        self._conn: sqlite3.Connection | None = None
        self._locked: Totals | None = None
        if self.location == MEMORY:
            if new is None:
                raise LedgerError("no ledger at :memory: (a memory ledger is always new)")
            meta = new()
            conn = _connect(MEMORY)
            _create_schema(conn, meta)
            self._conn = conn
        else:
            if not os.path.lexists(self.location):
                if new is None:
                    raise LedgerError(f"no ledger at {self.location}")
                self._create_file(new())
            self._open_existing()
        try:
            self.meta = self._read_meta()
        except BaseException:
            self.close()
            raise

    @classmethod
    def opener(cls, path: str | os.PathLike[str]) -> Callable[[Callable[[], LedgerMeta] | None], SqliteLedgerStore]:
        """A :data:`~pmixed.privacy.ledger_store.StoreOpener` for ``path``."""
        return lambda new: cls(path, new)

    # -- creation -------------------------------------------------------------------------------
    def _create_file(self, meta: LedgerMeta) -> None:
        """Build the ledger under a temporary name, then move it into place atomically, so that
        ``path`` is either absent or a complete ledger (never an empty or half-made file), and a
        ledger that exists is never replaced."""
        path = self.location
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise LedgerError(f"cannot create ledger {path}: directory {directory} does not exist")
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            try:
                conn = _connect(tmp)
                try:
                    _create_schema(conn, meta)
                finally:
                    conn.close()  # last connection: checkpoints the WAL into the main file
            except sqlite3.Error as e:
                raise LedgerError(f"cannot create ledger {path}: {e}") from e
            _fsync_file(tmp)
            try:
                os.link(tmp, path)  # atomic, and fails if someone else created it meanwhile
            except FileExistsError:
                pass  # a concurrent creator won: open theirs (and check it matches)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise LedgerError(f"cannot create ledger {path}: {e}") from e
                _move_into_place_without_links(tmp, path)
            _fsync_dir(directory)
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(tmp + suffix)
                except FileNotFoundError:
                    pass

    # -- opening --------------------------------------------------------------------------------
    def _open_existing(self) -> None:
        path = self.location
        # Never open() the file itself: closing any descriptor of it would cancel the POSIX locks
        # that SQLite connections of this process hold on it (sqlite.org/howtocorrupt.html 2.2),
        # letting another process delete the WAL under them. stat() opens nothing.
        try:
            st = os.stat(path)
        except OSError as e:
            raise LedgerError(f"cannot read ledger {path}: {e}") from e
        if stat.S_ISDIR(st.st_mode):
            raise LedgerError(f"{path} is a directory, not a pmixed ledger")
        if st.st_size == 0:  # SQLite would take it for an empty database; ours never are
            raise _not_ledger(path)
        try:
            conn = _connect(path)
        except sqlite3.OperationalError as e:
            raise LedgerError(f"cannot open ledger {path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise _not_ledger(path) from e
        try:
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                if app_id != APPLICATION_ID:
                    raise LedgerError(
                        f"{path} is a SQLite file of another application, not a pmixed ledger "
                        f"(foreign file: application_id={app_id:#x}, expected {APPLICATION_ID:#x})"
                    )
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in (1, SCHEMA_VERSION):
                    raise LedgerError(
                        f"{path}: ledger schema version {version} is not supported "
                        f"(this pmixed reads versions 1 and {SCHEMA_VERSION})"
                    )
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                missing = {"meta", "charges", "totals"} - tables
                if missing:
                    raise LedgerError(
                        f"{path} is not a pmixed ledger (foreign or damaged file: "
                        f"missing tables {sorted(missing)})"
                    )
                check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                if check != "ok":
                    raise LedgerError(f"ledger {path} is corrupt: {check}")
                conn.execute("PRAGMA journal_mode = WAL")  # persistent; a no-op once set
                conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit
                if version == 1:
                    _upgrade_from_1(conn)
            except sqlite3.DatabaseError as e:
                raise _not_ledger(path) from e
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _read_meta(self) -> LedgerMeta:
        path = self.location
        try:
            row = self._db().execute(
                "SELECT format, epsilon, delta, orders, created_at, package_version, rule FROM meta WHERE id = 1"
            ).fetchone()
        except sqlite3.DatabaseError as e:
            raise _not_ledger(path) from e
        if row is None:
            raise LedgerError(f"ledger {path} is damaged: its meta row is missing")
        fmt, f_eps, f_delta, f_orders, created_at, pkg_version, rule = row
        if fmt != FORMAT:
            raise LedgerError(f"{path} is not a pmixed ledger (foreign file: format {fmt!r}, expected {FORMAT!r})")
        return LedgerMeta.from_row(path, "meta", f_eps, f_delta, f_orders, rule, created_at, pkg_version)

    # -- the store protocol -----------------------------------------------------------------------
    @property
    def connection(self) -> sqlite3.Connection:
        """The SQLite connection (for inspection; do not write through it)."""
        return self._db()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"ledger {self.location} is closed")
        return self._conn

    def _n(self) -> int:
        return len(self.meta.orders)

    def _totals_row(self, conn: sqlite3.Connection) -> Totals:
        row = conn.execute("SELECT rdp, n_charges, last_charge_id FROM totals WHERE id = 1").fetchone()
        return totals_from_row(row, self._n(), self.location)

    def read_totals(self) -> Totals:
        try:
            return self._totals_row(self._db())
        except sqlite3.Error as e:
            raise LedgerError(f"cannot read ledger {self.location}: {e}") from e

    def lock_totals(self) -> Totals:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock, across processes
        except sqlite3.Error as e:
            raise LedgerError(f"cannot lock ledger {self.location} for writing: {e}") from e
        try:
            self._locked = self._totals_row(conn)
        except BaseException as exc:
            self.rollback()
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"cannot read ledger {self.location}: {exc}") from exc
            raise
        return self._locked

    def append(self, charge: NewCharge, spent_after: tuple[float, ...]) -> int:
        conn = self._db()
        locked = self._locked
        if locked is None or not conn.in_transaction:
            raise LedgerError(f"ledger {self.location}: append() outside lock_totals()")
        try:
            cur = conn.execute(
                f"INSERT INTO charges ({_CHARGE_COLUMNS.removeprefix('id, ')}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    charge.time, charge.count, charge.label, dump_curve(charge.rdp), charge.epsilon_after,
                    charge.mechanism, dump_params(charge.params),
                ),
            )
            charge_id = cur.lastrowid
            conn.execute(
                "UPDATE totals SET rdp = ?, n_charges = ?, last_charge_id = ? WHERE id = 1",
                (dump_curve(spent_after), locked.n_charges + 1, charge_id),
            )
        except sqlite3.Error as e:
            raise LedgerError(f"charge not recorded in ledger {self.location}: {e}") from e
        return charge_id

    def commit(self) -> None:
        conn = self._db()
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise LedgerError(f"charge not recorded in ledger {self.location}: {e}") from e
        finally:
            self._locked = None

    def rollback(self) -> None:
        self._locked = None
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        check_limit(limit)
        sql = f"SELECT {_CHARGE_COLUMNS} FROM charges ORDER BY id DESC"
        args: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            args = (limit,)
        try:
            rows = self._db().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise LedgerError(f"cannot read ledger {self.location}: {e}") from e
        return charge_records(reversed(rows), self._n(), self.location)

    def snapshot(self) -> tuple[Totals, list[ChargeRecord]]:
        conn = self._db()
        try:
            conn.execute("BEGIN")  # one read snapshot
            try:
                totals = self._totals_row(conn)
                rows = conn.execute(f"SELECT {_CHARGE_COLUMNS} FROM charges ORDER BY id").fetchall()
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise _not_ledger(self.location) from e
        return totals, charge_records(rows, self._n(), self.location)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abandon(self) -> None:
        """Forget the connection without closing it (after a fork: the parent's to close)."""
        self._conn = None


def _create_schema(conn: sqlite3.Connection, meta: LedgerMeta) -> None:
    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise LedgerError("cannot create a ledger in a non-empty database")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute(
            "INSERT INTO meta (id, format, epsilon, delta, orders, created_at, package_version, rule) "
            "VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
            (
                FORMAT, meta.epsilon, meta.delta, json.dumps(list(meta.orders)),
                meta.created_at, meta.package_version, meta.rule,
            ),
        )
        conn.execute(
            "INSERT INTO totals (id, rdp, n_charges, last_charge_id) VALUES (1, ?, 0, 0)",
            (dump_curve((0.0,) * len(meta.orders)),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _upgrade_from_1(conn: sqlite3.Connection) -> None:
    """Add schema 2's columns to a version 1 ledger, in one transaction (another process may
    have upgraded it meanwhile: re-checked under the write lock)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 1:
            for stmt in _UPGRADE_FROM_1:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _move_into_place_without_links(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists, atomically with respect to other
    creators: they take turns through an ``O_EXCL`` claim file."""
    claim = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.creating")
    deadline = time.monotonic() + CLAIM_TIMEOUT_S
    while True:
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if os.path.lexists(path):
                return  # the claim's holder has put its ledger in place: open that one
            if time.monotonic() > deadline:
                raise LedgerError(
                    f"cannot create ledger {path}: another process has been creating it for "
                    f"{CLAIM_TIMEOUT_S:g} s (claim file {claim}); if no pmixed process is running "
                    f"on it, remove the claim file"
                ) from None
            time.sleep(0.01)
            continue
        except OSError as e:
            raise LedgerError(f"cannot create ledger {path}: {e}") from e
        break
    try:
        os.close(fd)
        if not os.path.lexists(path):  # holding the claim: no other creator can get in between
            os.rename(tmp, path)
    finally:
        os.unlink(claim)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
