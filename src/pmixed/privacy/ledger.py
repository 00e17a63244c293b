"""A durable privacy ledger: the spent RDP curve of one budget, kept in a SQLite file.

Every released token must be charged *before* it is released::

    with Ledger("budget.ledger", epsilon=8.0, delta=1e-5) as ledger:
        receipt = ledger.charge(charge)   # raises BudgetExhausted -> do not release
        release(token)                    # only after charge() has returned

:meth:`Ledger.charge` runs one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock,
reads the running totals, computes the epsilon after the charge, and either rolls back
(:class:`BudgetExhausted`, nothing recorded) or inserts the charge, updates the totals and
commits. ``synchronous=FULL`` makes the commit durable (fsync) before ``charge`` returns. The
write lock serialises charges across processes; a per-object lock serialises threads sharing a
:class:`Ledger` (threads may also open their own). A crash between the commit and the release
wastes budget but never releases an uncharged token; a crash before the commit records nothing.
Re-opening resumes the spent budget exactly.

Do not open the ledger file with ``open()`` (or copy it with tools that do) in a process that
holds a :class:`Ledger` on it: closing such a descriptor cancels SQLite's POSIX locks for the
whole process, which can let another process delete the WAL under it (lost charges). Copy a
live ledger with SQLite's backup API or ``VACUUM INTO`` instead.

Schema (``PRAGMA application_id`` = :data:`APPLICATION_ID`, ``PRAGMA user_version`` =
:data:`SCHEMA_VERSION`, WAL journal)::

    meta    (id=1, format, epsilon, delta, orders JSON, created_at, package_version)
    charges (id AUTOINCREMENT, time, count, label, rdp JSON per ledger order, epsilon_after)
    totals  (id=1, rdp JSON: sum over charges of count*rdp per order, n_charges, last_charge_id)

RDP values are stored as JSON lists of numbers with ``null`` for inf. On open the totals row is
checked against a replay of the charges (same arithmetic, same order: bit-exact), so partial
corruption or hand edits of one table are detected (a consistent edit of both is not: the file
is not signed).

A ``":memory:"`` path gives a private, non-durable ledger (tests).

This module is pure standard library (sqlite3); no torch.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pmixed.errors import BudgetExhausted, ConfigError, LedgerError
from pmixed.privacy.accountant import (
    DEFAULT_ORDERS,
    RdpCharge,
    _describe,
    _queries_left,
    check_orders,
    compose_curve,
    curve_epsilon,
    project_charge,
)
from pmixed.privacy.conversion import check_delta, check_epsilon

__all__ = ["APPLICATION_ID", "FORMAT", "SCHEMA_VERSION", "ChargeRecord", "Ledger", "Receipt"]

FORMAT = "pmixed-ledger/1"
#: ``PRAGMA application_id`` of a pmixed ledger: b"PMXD" as a big-endian 32-bit integer.
APPLICATION_ID = 0x504D5844
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE meta (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    format          TEXT    NOT NULL,
    epsilon         REAL    NOT NULL,
    delta           REAL    NOT NULL,
    orders          TEXT    NOT NULL,
    created_at      TEXT    NOT NULL,
    package_version TEXT    NOT NULL
);
CREATE TABLE charges (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          REAL    NOT NULL,
    count         INTEGER NOT NULL CHECK (count >= 1),
    label         TEXT    NOT NULL,
    rdp           TEXT    NOT NULL,
    epsilon_after REAL    NOT NULL
);
CREATE TABLE totals (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    rdp            TEXT    NOT NULL,
    n_charges      INTEGER NOT NULL,
    last_charge_id INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Receipt:
    """Proof that a charge was committed: its row id, the epsilon spent after it, and what is left."""

    id: int
    epsilon_spent: float
    remaining: float


@dataclass(frozen=True)
class ChargeRecord:
    """One row of the ``charges`` table. ``rdp`` is per unit, on the ledger's orders."""

    id: int
    time: float
    count: int
    label: str
    rdp: tuple[float, ...]
    epsilon_after: float


def _package_version() -> str:
    # importlib.metadata rather than ``pmixed.__version__``: importing the root package would
    # give pmixed.privacy an (indirect) import path to the torch-backed mechanism.
    try:
        from importlib.metadata import version

        return version("pmixed")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def _dump_curve(curve: Sequence[float]) -> str:
    return json.dumps([None if math.isinf(r) else r for r in curve], allow_nan=False)


def _load_curve(text: str, n: int) -> tuple[float, ...]:
    values = json.loads(text)
    if not isinstance(values, list) or len(values) != n:
        raise ValueError(f"expected a list of {n} values")
    out = []
    for v in values:
        if v is None:
            out.append(math.inf)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            out.append(float(v))
        else:
            raise ValueError(f"bad RDP value {v!r}")
    return tuple(out)


def _not_ledger(path: str) -> LedgerError:
    return LedgerError(f"not a pmixed ledger (corrupt or foreign file): {path}")


class Ledger:
    """The durable counterpart of :class:`~pmixed.privacy.accountant.RdpAccountant`.

    ``Ledger(path, epsilon=..., delta=...)`` creates the file if it does not exist (``create``)
    or opens it. When the file exists, ``epsilon``, ``delta`` and ``orders`` may be ``None``
    to adopt the file's; any value given must equal the file's, else :class:`LedgerError`.
    A new ledger needs ``epsilon`` and ``delta``; ``orders=None`` then means DEFAULT_ORDERS.

    Use one :class:`Ledger` per process (it refuses to be used after a fork); threads may share
    it or open their own.
    """

    #: Test hook: called inside charge()'s transaction, just before COMMIT.
    _hook_before_commit: Callable[[], None] | None = None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        epsilon: float | None = None,
        delta: float | None = None,
        orders: Sequence[float] | None = None,
        create: bool = True,
    ):
        self._path = os.fspath(path)
        if epsilon is not None:
            check_epsilon(epsilon)
            epsilon = float(epsilon)
        if delta is not None:
            check_delta(delta)
            delta = float(delta)
        if orders is not None:
            orders = check_orders(orders)
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        if self._path == MEMORY:
            self._init_memory(epsilon, delta, orders)
        else:
            self._init_file(epsilon, delta, orders, create)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Ledger:
        """Open an existing ledger, adopting its budget."""
        return cls(path, create=False)

    # -- opening --------------------------------------------------------------------------------
    def _init_memory(self, epsilon, delta, orders) -> None:
        if epsilon is None or delta is None:
            raise ConfigError("epsilon" if epsilon is None else "delta", "a new ledger needs a budget")
        conn = self._connect(MEMORY)
        _create_schema(conn, epsilon, delta, orders or DEFAULT_ORDERS)
        self._conn = conn
        self._load_meta(epsilon, delta, orders)

    def _init_file(self, epsilon, delta, orders, create: bool) -> None:
        path = self._path
        if not os.path.lexists(path):
            if not create:
                raise LedgerError(f"no ledger at {path}")
            if epsilon is None or delta is None:
                raise ConfigError(
                    "epsilon" if epsilon is None else "delta",
                    f"a new ledger needs a budget (no ledger at {path})",
                )
            self._create_file(epsilon, delta, orders or DEFAULT_ORDERS)
        self._open_existing(epsilon, delta, orders)

    def _create_file(self, epsilon: float, delta: float, orders: tuple[float, ...]) -> None:
        """Build the ledger under a temporary name, then link it into place, so that ``path``
        is either absent or a complete ledger (never an empty or half-made file)."""
        path = self._path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise LedgerError(f"cannot create ledger {path}: directory {directory} does not exist")
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            try:
                conn = self._connect(tmp)
                try:
                    _create_schema(conn, epsilon, delta, orders)
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
                if not os.path.lexists(path):  # filesystem without hard links
                    os.rename(tmp, path)
            _fsync_dir(directory)
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(tmp + suffix)
                except FileNotFoundError:
                    pass

    def _open_existing(self, epsilon, delta, orders) -> None:
        path = self._path
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
            conn = self._connect(path)
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
                if version != SCHEMA_VERSION:
                    raise LedgerError(
                        f"{path}: ledger schema version {version} is not supported "
                        f"(this pmixed reads version {SCHEMA_VERSION})"
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
                self._set_wal(conn)
            except sqlite3.DatabaseError as e:
                raise _not_ledger(path) from e
            self._conn = conn
            self._load_meta(epsilon, delta, orders)
            self._verify()
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _connect(self, target: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            target, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @staticmethod
    def _set_wal(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent; a no-op once set
        conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit

    def _load_meta(self, epsilon, delta, orders) -> None:
        path = self._path
        try:
            row = self._conn.execute(
                "SELECT format, epsilon, delta, orders, created_at, package_version FROM meta WHERE id = 1"
            ).fetchone()
        except sqlite3.DatabaseError as e:
            raise _not_ledger(path) from e
        if row is None:
            raise LedgerError(f"ledger {path} is damaged: its meta row is missing")
        fmt, f_eps, f_delta, f_orders, created_at, pkg_version = row
        if fmt != FORMAT:
            raise LedgerError(f"{path} is not a pmixed ledger (foreign file: format {fmt!r}, expected {FORMAT!r})")
        try:
            check_epsilon(f_eps)
            check_delta(f_delta)
            file_orders = check_orders(json.loads(f_orders))
        except (ConfigError, ValueError, TypeError) as e:
            raise LedgerError(f"ledger {path} is damaged: bad budget in meta ({e})") from e
        mismatches = []
        if epsilon is not None and epsilon != f_eps:
            mismatches.append(f"epsilon {epsilon!r} was given, the file has {f_eps!r}")
        if delta is not None and delta != f_delta:
            mismatches.append(f"delta {delta!r} was given, the file has {f_delta!r}")
        if orders is not None and tuple(orders) != file_orders:
            mismatches.append(f"orders {list(orders)} were given, the file has {list(file_orders)}")
        if mismatches:
            raise LedgerError(
                f"ledger {path} was written for a different budget: " + "; ".join(mismatches)
                + " (pass None to adopt the file's budget)"
            )
        self._epsilon = float(f_eps)
        self._delta = float(f_delta)
        self._orders = file_orders
        self._created_at = created_at
        self._package_version = pkg_version

    def _verify(self) -> None:
        """Replay the charges and compare with the totals row (bit-exact: same arithmetic)."""
        path = self._path
        n = len(self._orders)
        conn = self._conn
        try:
            conn.execute("BEGIN")  # one read snapshot
            try:
                trow = conn.execute("SELECT rdp, n_charges, last_charge_id FROM totals WHERE id = 1").fetchone()
                if trow is None:
                    raise LedgerError(f"ledger {path} is damaged: its totals row is missing")
                totals = _load_curve(trow[0], n)
                curve = (0.0,) * n
                count = 0
                last_id = 0
                last_eps = 0.0
                for cid, c_count, c_rdp, c_eps in conn.execute(
                    "SELECT id, count, rdp, epsilon_after FROM charges ORDER BY id"
                ):
                    if not isinstance(c_count, int) or c_count < 1:
                        raise ValueError(f"charge {cid} has count {c_count!r}")
                    curve = compose_curve(curve, _load_curve(c_rdp, n), c_count)
                    count += 1
                    last_id = cid
                    last_eps = c_eps
            finally:
                conn.execute("COMMIT")
        except (ValueError, TypeError) as e:
            raise LedgerError(f"ledger {path} is damaged: {e}") from e
        except sqlite3.DatabaseError as e:
            raise _not_ledger(path) from e
        if curve != totals or count != trow[1] or last_id != trow[2]:
            raise LedgerError(
                f"ledger {path} is inconsistent (tampered or partially corrupt): the totals row "
                f"({trow[1]} charges, last id {trow[2]}) does not equal the sum of the {count} "
                f"charges recorded (last id {last_id})"
            )
        eps = curve_epsilon(self._orders, totals, self._delta)
        if count and last_eps != eps:
            raise LedgerError(
                f"ledger {path} is inconsistent (tampered or partially corrupt): the last charge "
                f"(id {last_id}) records epsilon_after={last_eps!r}, the totals give {eps!r}"
            )
        if not eps <= self._epsilon:
            raise LedgerError(
                f"ledger {path} is inconsistent: it records epsilon={eps!r} spent, above its "
                f"limit {self._epsilon!r}"
            )

    # -- properties -------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def epsilon(self) -> float:
        """The limit."""
        return self._epsilon

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def orders(self) -> tuple[float, ...]:
        return self._orders

    @property
    def created_at(self) -> str:
        return self._created_at

    @property
    def package_version(self) -> str:
        """The pmixed version that created the file."""
        return self._package_version

    @property
    def closed(self) -> bool:
        return self._conn is None

    # -- reads --------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"ledger {self._path} is closed")
        if os.getpid() != self._pid:
            raise LedgerError(
                f"ledger {self._path} was opened in process {self._pid}; open it again in this "
                f"process ({os.getpid()}) instead of inheriting it across fork"
            )
        return self._conn

    def _read_totals(self, conn: sqlite3.Connection) -> tuple[tuple[float, ...], int]:
        row = conn.execute("SELECT rdp, n_charges FROM totals WHERE id = 1").fetchone()
        if row is None:
            raise LedgerError(f"ledger {self._path} is damaged: its totals row is missing")
        try:
            return _load_curve(row[0], len(self._orders)), row[1]
        except (ValueError, TypeError) as e:
            raise LedgerError(f"ledger {self._path} is damaged: bad totals ({e})") from e

    def spent_rdp(self) -> tuple[float, ...]:
        """The spent RDP at each of :attr:`orders` (as committed, possibly by other processes)."""
        with self._lock:
            try:
                return self._read_totals(self._db())[0]
            except sqlite3.Error as e:
                raise LedgerError(f"cannot read ledger {self._path}: {e}") from e

    def charges(self) -> int:
        """How many charges (events) were committed."""
        with self._lock:
            try:
                return self._read_totals(self._db())[1]
            except sqlite3.Error as e:
                raise LedgerError(f"cannot read ledger {self._path}: {e}") from e

    def epsilon_spent(self) -> float:
        return curve_epsilon(self._orders, self.spent_rdp(), self._delta)

    def remaining(self) -> float:
        """The epsilon left (limit - spent, >= 0). Informational; :meth:`can_afford` decides."""
        return max(0.0, self._epsilon - self.epsilon_spent())

    def epsilon_if(self, charge: RdpCharge) -> float:
        """The epsilon spent after ``charge`` given what is committed now; records nothing.
        Only :meth:`charge` is authoritative (another process may charge in between)."""
        rdp = project_charge(charge, self._orders)
        curve = compose_curve(self.spent_rdp(), rdp, charge.count)
        return curve_epsilon(self._orders, curve, self._delta)

    def can_afford(self, charge: RdpCharge) -> bool:
        return self.epsilon_if(charge) <= self._epsilon

    def queries_left(self, rdp: Sequence[float]) -> int:
        """The largest k >= 0 such that k more queries with per-query RDP curve ``rdp`` (at
        :attr:`orders`) fit the budget given what is committed now and k + 1 do not (see
        :func:`~pmixed.privacy.accountant.queries_left`). Informational, like :meth:`can_afford`."""
        return _queries_left(self._orders, self.spent_rdp(), rdp, self._delta, self._epsilon)

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        """The committed charges, oldest first; with ``limit``, only the ``limit`` most recent."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError("limit", f"must be None or an integer >= 0, got {limit!r}")
        sql = "SELECT id, time, count, label, rdp, epsilon_after FROM charges ORDER BY id DESC"
        args: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            args = (limit,)
        n = len(self._orders)
        with self._lock:
            try:
                rows = self._db().execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise LedgerError(f"cannot read ledger {self._path}: {e}") from e
        try:
            return [
                ChargeRecord(r[0], r[1], r[2], r[3], _load_curve(r[4], n), r[5]) for r in reversed(rows)
            ]
        except (ValueError, TypeError) as e:
            raise LedgerError(f"ledger {self._path} is damaged: {e}") from e

    # -- the one mutation -----------------------------------------------------------------------------
    def charge(self, charge: RdpCharge) -> Receipt:
        """Record ``charge`` durably, or refuse it.

        Returns only after the COMMIT (fsync'd) has succeeded: the caller may release then and
        only then. Raises :class:`BudgetExhausted` when the epsilon after the charge would exceed
        the limit (nothing recorded; exactly reaching the limit is allowed) and
        :class:`LedgerError` when the file cannot be written (nothing recorded either; do not
        release).
        """
        rdp = project_charge(charge, self._orders)  # validates before touching the file
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")  # the write lock, across processes
            except sqlite3.Error as e:
                raise LedgerError(f"cannot lock ledger {self._path} for writing: {e}") from e
            try:
                totals, n_charges = self._read_totals(conn)
                curve = compose_curve(totals, rdp, charge.count)
                eps_after = curve_epsilon(self._orders, curve, self._delta)
                if not eps_after <= self._epsilon:
                    conn.execute("ROLLBACK")
                    raise BudgetExhausted(
                        curve_epsilon(self._orders, totals, self._delta),
                        eps_after,
                        self._epsilon,
                        detail=_describe(charge),
                    )
                cur = conn.execute(
                    "INSERT INTO charges (time, count, label, rdp, epsilon_after) VALUES (?, ?, ?, ?, ?)",
                    (time.time(), charge.count, charge.label, _dump_curve(rdp), eps_after),
                )
                charge_id = cur.lastrowid
                conn.execute(
                    "UPDATE totals SET rdp = ?, n_charges = ?, last_charge_id = ? WHERE id = 1",
                    (_dump_curve(curve), n_charges + 1, charge_id),
                )
                hook = self._hook_before_commit
                if hook is not None:
                    hook()
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(f"charge not recorded in ledger {self._path}: {exc}") from exc
                raise
        return Receipt(charge_id, eps_after, max(0.0, self._epsilon - eps_after))

    #: The accountant's name for the same operation.
    compose = charge

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and os.getpid() == self._pid:
                conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"spent={self.epsilon_spent():.6g}"
        return f"Ledger({self._path!r}, epsilon={self._epsilon!r}, delta={self._delta!r}, {state})"


def _create_schema(conn: sqlite3.Connection, epsilon: float, delta: float, orders: tuple[float, ...]) -> None:
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
            "INSERT INTO meta (id, format, epsilon, delta, orders, created_at, package_version) "
            "VALUES (1, ?, ?, ?, ?, ?, ?)",
            (
                FORMAT,
                epsilon,
                delta,
                json.dumps(list(orders)),
                _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                _package_version(),
            ),
        )
        conn.execute(
            "INSERT INTO totals (id, rdp, n_charges, last_charge_id) VALUES (1, ?, 0, 0)",
            (_dump_curve((0.0,) * len(orders)),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


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

