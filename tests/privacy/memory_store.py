"""An in-memory LedgerStore: a fake of the store protocol (pmixed.privacy.ledger_store), written
from the protocol's docstrings only, to show that the budget policy does not depend on SQLite."""

from __future__ import annotations

import copy
import itertools
import threading

from pmixed.errors import LedgerError
from pmixed.privacy.accountant import ChargeRecord
from pmixed.privacy.ledger_store import LedgerMeta, NewCharge, Totals

_names = itertools.count(1)


class MemoryDatabase:
    """What a server would hold: one budget's meta, totals and history, and its write lock."""

    def __init__(self) -> None:
        self.name = f"memory-db-{next(_names)}"
        self.meta: LedgerMeta | None = None
        self.totals: Totals | None = None
        self.records: list[ChargeRecord] = []
        self.write_lock = threading.Lock()
        self.guard = threading.Lock()  # short critical sections (reads, commit)

    def opener(self):
        return lambda new: MemoryLedgerStore(self, new)


class MemoryLedgerStore:
    def __init__(self, db: MemoryDatabase, new) -> None:
        self._db = db
        self.location = db.name
        with db.guard:
            if db.meta is None:
                if new is None:
                    raise LedgerError(f"no ledger at {db.name}")
                meta = new()
                db.meta = meta
                db.totals = Totals((0.0,) * len(meta.orders), 0, 0)
            self.meta = db.meta
        self._held = False
        self._pending: tuple[ChargeRecord, Totals] | None = None
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise LedgerError(f"ledger {self.location} is closed")

    def read_totals(self) -> Totals:
        self._check()
        with self._db.guard:
            return self._db.totals

    def lock_totals(self) -> Totals:
        self._check()
        if not self._db.write_lock.acquire(timeout=30):
            raise LedgerError(f"cannot lock ledger {self.location} for writing")
        self._held = True
        self._pending = None
        with self._db.guard:
            return self._db.totals

    def append(self, charge: NewCharge, spent_after: tuple[float, ...]) -> int:
        if not self._held:
            raise LedgerError("append() outside lock_totals()")
        t = self._db.totals
        cid = t.last_charge_id + 1
        rec = ChargeRecord(
            cid, charge.time, charge.count, charge.label, tuple(charge.rdp), charge.epsilon_after,
            charge.mechanism, copy.deepcopy(dict(charge.params)),
        )
        self._pending = (rec, Totals(tuple(spent_after), t.n_charges + 1, cid))
        return cid

    def commit(self) -> None:
        if not self._held:
            raise LedgerError("commit() outside lock_totals()")
        try:
            if self._pending is not None:
                rec, totals = self._pending
                with self._db.guard:
                    self._db.records.append(rec)
                    self._db.totals = totals
        finally:
            self._pending = None
            self._held = False
            self._db.write_lock.release()

    def rollback(self) -> None:
        self._pending = None
        if self._held:
            self._held = False
            self._db.write_lock.release()

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        self._check()
        with self._db.guard:
            out = list(self._db.records)
        return out if limit is None else out[len(out) - limit :]

    def snapshot(self) -> tuple[Totals, list[ChargeRecord]]:
        self._check()
        with self._db.guard:
            return self._db.totals, list(self._db.records)

    def close(self) -> None:
        self.rollback()
        self._closed = True
