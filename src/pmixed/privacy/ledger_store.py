"""What the budget policy (privacy/ledger.py) needs from the place where a ledger is kept.

A :class:`LedgerStore` holds one budget: its :class:`LedgerMeta` (fixed at creation), its running
:class:`Totals` and the history of committed charges. The policy charges through one write
transaction::

    totals = store.lock_totals()        # take the budget's write lock; read the totals under it
    try:
        ...decide (the acceptance rule)...
        store.append(new_charge, spent_after)   # inside the transaction
        store.commit()                  # durable (fsync'd) before it returns
    except BaseException:
        store.rollback()                # nothing recorded
        raise

so a store only has to provide a lock that serialises writers across threads and processes,
atomic commit and durable storage: SQLite's ``BEGIN IMMEDIATE`` (privacy/ledger_sqlite.py), or
``BEGIN; SELECT ... FROM totals WHERE budget = $1 FOR UPDATE`` in PostgreSQL. Creation, opening
and the physical checks of the backing store (format, version, integrity) belong to the store; the
replay verification (totals == sum of the history, last epsilon, limit) is the policy's and uses
:meth:`LedgerStore.snapshot`.

A store is opened by a :data:`StoreOpener`: called with a function that returns the meta of a new
budget (or None: open only), it creates the budget if it does not exist and returns the store.

Pure standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pmixed.privacy.accountant import ChargeRecord

__all__ = ["LedgerMeta", "LedgerStore", "NewCharge", "StoreOpener", "Totals", "charge_records", "dump_curve", "load_curve", "load_params"]


@dataclass(frozen=True)
class LedgerMeta:
    """The budget a ledger was created for, as stored (validated by the policy on open)."""

    epsilon: float
    delta: float
    orders: tuple[float, ...]
    rule: str
    created_at: str = ""
    package_version: str = ""

    @classmethod
    def from_row(cls, location: str, where: str, epsilon: float, delta: float, orders_json: str, rule: str,
                 created_at: str, package_version: str) -> LedgerMeta:
        """The meta of a stored budget row (``orders`` as JSON); a bad orders field is a
        LedgerError naming the ledger and ``where`` it was read from."""
        from pmixed.errors import LedgerError

        try:
            orders = json.loads(orders_json)
        except (ValueError, TypeError) as e:
            raise LedgerError(f"ledger {location} is damaged: bad orders in {where} ({e})") from e
        return cls(epsilon, delta, orders, rule, created_at, package_version)


@dataclass(frozen=True)
class Totals:
    """The running totals: the spent curve (sum of count * rdp per order), how many charges were
    committed and the id of the last one (0 when none)."""

    rdp: tuple[float, ...]
    n_charges: int
    last_charge_id: int


@dataclass(frozen=True)
class NewCharge:
    """A charge the policy accepted, to be appended (the store assigns its id)."""

    time: float
    count: int
    label: str
    rdp: tuple[float, ...]
    epsilon_after: float
    mechanism: str = ""
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)


class LedgerStore(Protocol):
    """One budget's durable state. Methods raise :class:`~pmixed.errors.LedgerError` when the
    backing store cannot be read or written (never a driver's own exception)."""

    #: Where the ledger lives (a path, a DSN and budget id, ...), for messages.
    location: str
    #: The budget, read when the store was opened.
    meta: LedgerMeta

    def read_totals(self) -> Totals:
        """The totals as committed now (no lock)."""
        ...

    def lock_totals(self) -> Totals:
        """Begin the write transaction: take the budget's write lock (serialising writers across
        threads and processes) and read the totals under it."""
        ...

    def append(self, charge: NewCharge, spent_after: tuple[float, ...]) -> int:
        """Inside the transaction: record ``charge`` and set the totals to ``spent_after`` (one
        more charge, this one last). Returns the new charge's id (increasing)."""
        ...

    def commit(self) -> None:
        """Commit the transaction; returns only once it is durable."""
        ...

    def rollback(self) -> None:
        """Abandon the transaction, if one is open (never raises)."""
        ...

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        """The committed charges, oldest first; with ``limit``, only the ``limit`` most recent."""
        ...

    def snapshot(self) -> tuple[Totals, list[ChargeRecord]]:
        """The totals and the whole history from one consistent read (for verification)."""
        ...

    def close(self) -> None: ...


StoreOpener = Callable[[Callable[[], LedgerMeta] | None], LedgerStore]


# ----------------------------------------------------------------- stored encodings (every store)


def dump_curve(curve: Sequence[float]) -> str:
    """An RDP curve as stored: JSON, inf as null."""
    return json.dumps([None if math.isinf(r) else r for r in curve], allow_nan=False)


def load_curve(text: str, n: int) -> tuple[float, ...]:
    """A stored RDP curve of ``n`` orders back (ValueError on anything but non-negative numbers or null)."""
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


def load_params(text: str) -> dict:
    """A stored charge's parameters (a JSON object)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"charge params must be a JSON object, got {text!r}")
    return value


def totals_from_row(row, n: int, location: str) -> Totals:
    """The stored totals row (rdp, n_charges, last_charge_id), as every store selects it, ->
    Totals over ``n`` orders; a missing or undecodable row is a damaged ledger (LedgerError)."""
    from pmixed.errors import LedgerError

    if row is None:
        raise LedgerError(f"ledger {location} is damaged: its totals row is missing")
    try:
        return Totals(load_curve(row[0], n), row[1], row[2])
    except (ValueError, TypeError) as e:
        raise LedgerError(f"ledger {location} is damaged: bad totals ({e})") from e


def charge_records(rows, n: int, location: str) -> list[ChargeRecord]:
    """Stored charge rows (id, time, count, label, rdp, epsilon_after, mechanism, params), as
    every store selects them, -> ChargeRecords over ``n`` orders; a row that does not decode is
    a damaged ledger (LedgerError)."""
    from pmixed.errors import LedgerError

    try:
        return [
            ChargeRecord(r[0], r[1], r[2], r[3], load_curve(r[4], n), r[5], r[6], load_params(r[7]))
            for r in rows
        ]
    except (ValueError, TypeError) as e:
        raise LedgerError(f"ledger {location} is damaged: {e}") from e
