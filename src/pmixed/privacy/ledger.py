"""A durable privacy ledger: the budget policy (refuse or commit) over a ledger store.

Every released token must be charged *before* it is released::

    with Ledger("budget.ledger", epsilon=8.0, delta=1e-5) as ledger:
        receipt = ledger.charge(charge)   # raises BudgetExhausted -> do not release
        release(token)                    # only after charge() has returned

:meth:`Ledger.charge` runs one write transaction of its store (privacy/ledger_store.py): it takes
the budget's write lock, reads the running totals under it, computes the epsilon after the charge
with the ledger's acceptance rule (privacy/acceptance.py), and either rolls back
(:class:`BudgetExhausted`, nothing recorded) or appends the charge and commits durably before
``charge`` returns. The store's lock serialises charges across processes; a per-object lock
serialises threads sharing a :class:`Ledger` (threads may also open their own). A crash between
the commit and the release wastes budget but never releases an uncharged token; a crash before
the commit records nothing. Re-opening resumes the spent budget exactly.

Each charge is stored with what it was (mechanism name and parameters, when the
:class:`~pmixed.privacy.accountant.RdpCharge` carries them) next to its RDP curve, so that a
ledger can be replayed and audited. On open the totals are checked against a replay of the
history (same arithmetic, same order: bit-exact) and the epsilon recorded with the last charge
against the rule's, so partial corruption or hand edits of one table are detected (a consistent
edit of both is not: the file is not signed). A ledger records its acceptance rule's name and is
never reopened under another rule.

The store: a path (or ``":memory:"``, a private non-durable ledger for tests) means SQLite
(privacy/ledger_sqlite.py: WAL, ``BEGIN IMMEDIATE``, ``synchronous=FULL``; keep the file on a
local filesystem). Any other :class:`~pmixed.privacy.ledger_store.LedgerStore` is passed as a
:data:`~pmixed.privacy.ledger_store.StoreOpener`.

The read API is :class:`~pmixed.privacy.accountant.Budget`'s, shared with
:class:`~pmixed.privacy.accountant.RdpAccountant`.

This module is pure standard library; no torch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

from pmixed.errors import ConfigError, LedgerError
from pmixed.privacy.acceptance import BEST_ORDER, AcceptanceRule, check_rule, rule_named
from pmixed.privacy.accountant import (
    DEFAULT_ORDERS,
    Budget,
    ChargeRecord,
    RdpCharge,
    Receipt,
    check_limit,
    check_orders,
    compose_curve,
    project_charge,
)
from pmixed.privacy.conversion import check_delta, check_epsilon
from pmixed.privacy.ledger_sqlite import (
    APPLICATION_ID,
    FORMAT,
    MEMORY,
    SCHEMA_VERSION,
    SqliteLedgerStore,
    new_meta,
)
from pmixed.privacy.ledger_store import LedgerMeta, LedgerStore, NewCharge, StoreOpener

__all__ = [
    "APPLICATION_ID",
    "FORMAT",
    "MEMORY",
    "SCHEMA_VERSION",
    "ChargeRecord",
    "Ledger",
    "LedgerStore",
    "Receipt",
    "StoreOpener",
]


class Ledger(Budget):
    """The durable counterpart of :class:`~pmixed.privacy.accountant.RdpAccountant`.

    ``Ledger(where, epsilon=..., delta=...)`` creates the ledger if it does not exist (``create``)
    or opens it; ``where`` is a path (SQLite) or a store opener. When the ledger exists,
    ``epsilon``, ``delta``, ``orders`` and ``rule`` may be ``None`` to adopt the ledger's; any
    value given must equal the ledger's, else :class:`LedgerError`. A new ledger needs
    ``epsilon`` and ``delta``; ``orders=None`` then means DEFAULT_ORDERS and ``rule=None``
    :data:`~pmixed.privacy.acceptance.BEST_ORDER`.

    Use one :class:`Ledger` per process (it refuses to be used after a fork); threads may share
    it or open their own.
    """

    def __init__(
        self,
        where: str | os.PathLike[str] | StoreOpener,
        *,
        epsilon: float | None = None,
        delta: float | None = None,
        orders: Sequence[float] | None = None,
        rule: AcceptanceRule | None = None,
        create: bool = True,
    ):
        if epsilon is not None:
            check_epsilon(epsilon)
            epsilon = float(epsilon)
        if delta is not None:
            check_delta(delta)
            delta = float(delta)
        if orders is not None:
            orders = check_orders(orders)
        if rule is not None:
            rule = check_rule(rule)
        opener: StoreOpener = where if callable(where) else SqliteLedgerStore.opener(where)
        label = os.fspath(where) if not callable(where) else repr(where)

        def new() -> LedgerMeta:
            if epsilon is None or delta is None:
                raise ConfigError(
                    "epsilon" if epsilon is None else "delta",
                    "a new ledger needs a budget" if label == MEMORY else f"a new ledger needs a budget (no ledger at {label})",
                )
            (rule or BEST_ORDER).check_orders(orders or DEFAULT_ORDERS)
            return new_meta(epsilon, delta, orders or DEFAULT_ORDERS, (rule or BEST_ORDER).name)

        self._path = label
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._store: LedgerStore | None = None
        store = opener(new if create else None)
        try:
            self._adopt(store, epsilon, delta, orders, rule)
            self._store = store
            self._verify()
        except BaseException:
            self._store = None
            store.close()
            raise

    @classmethod
    def open(cls, where: str | os.PathLike[str] | StoreOpener) -> Ledger:
        """Open an existing ledger, adopting its budget and rule."""
        return cls(where, create=False)

    # -- opening --------------------------------------------------------------------------------
    def _adopt(self, store: LedgerStore, epsilon, delta, orders, rule) -> None:
        where = store.location
        meta = store.meta
        try:
            check_epsilon(meta.epsilon)
            check_delta(meta.delta)
            file_orders = check_orders(meta.orders)
        except (ConfigError, ValueError, TypeError) as e:
            raise LedgerError(f"ledger {where} is damaged: bad budget in meta ({e})") from e
        mismatches = []
        if epsilon is not None and epsilon != meta.epsilon:
            mismatches.append(f"epsilon {epsilon!r} was given, the file has {meta.epsilon!r}")
        if delta is not None and delta != meta.delta:
            mismatches.append(f"delta {delta!r} was given, the file has {meta.delta!r}")
        if orders is not None and tuple(orders) != file_orders:
            mismatches.append(f"orders {list(orders)} were given, the file has {list(file_orders)}")
        if mismatches:
            raise LedgerError(
                f"ledger {where} was written for a different budget: " + "; ".join(mismatches)
                + " (pass None to adopt the file's budget)"
            )
        if rule is not None:
            if rule.name != meta.rule:
                raise LedgerError(
                    f"ledger {where} was written under the acceptance rule {meta.rule!r}; it cannot "
                    f"be used with the rule {rule.name!r} (pass rule=None to adopt the file's)"
                )
        else:
            rule = rule_named(meta.rule) if isinstance(meta.rule, str) else None
            if rule is None:
                raise LedgerError(
                    f"ledger {where} was written under the acceptance rule {meta.rule!r}, which this "
                    f"pmixed does not know (register it with pmixed.privacy.acceptance.register_rule)"
                )
        rule.check_orders(file_orders)
        self._path = where
        self._epsilon = float(meta.epsilon)
        self._delta = float(meta.delta)
        self._orders = file_orders
        self._rule = rule
        self._created_at = meta.created_at
        self._package_version = meta.package_version

    def _verify(self) -> None:
        """Replay the history and compare with the totals (bit-exact: same arithmetic)."""
        path = self._path
        totals, records = self._live().snapshot()
        curve = (0.0,) * len(self._orders)
        last_id, last_eps = 0, 0.0
        for rec in records:
            if isinstance(rec.count, bool) or not isinstance(rec.count, int) or rec.count < 1:
                raise LedgerError(f"ledger {path} is damaged: charge {rec.id} has count {rec.count!r}")
            curve = compose_curve(curve, rec.rdp, rec.count)
            last_id, last_eps = rec.id, rec.epsilon_after
        count = len(records)
        if curve != totals.rdp or count != totals.n_charges or last_id != totals.last_charge_id:
            raise LedgerError(
                f"ledger {path} is inconsistent (tampered or partially corrupt): the totals row "
                f"({totals.n_charges} charges, last id {totals.last_charge_id}) does not equal the "
                f"sum of the {count} charges recorded (last id {last_id})"
            )
        eps = self._rule.epsilon(self._orders, totals.rdp, self._delta)
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
        """Where the ledger lives (the store's location)."""
        return self._path

    @property
    def store(self) -> LedgerStore:
        return self._live()

    @property
    def created_at(self) -> str:
        return self._created_at

    @property
    def package_version(self) -> str:
        """The pmixed version that created the ledger."""
        return self._package_version

    @property
    def closed(self) -> bool:
        return self._store is None

    # -- reads ------------------------------------------------------------------------------------
    def _live(self) -> LedgerStore:
        if self._store is None:
            raise LedgerError(f"ledger {self._path} is closed")
        if os.getpid() != self._pid:
            raise LedgerError(
                f"ledger {self._path} was opened in process {self._pid}; open it again in this "
                f"process ({os.getpid()}) instead of inheriting it across fork"
            )
        return self._store

    def _totals(self) -> tuple[tuple[float, ...], int]:
        with self._lock:
            t = self._live().read_totals()
        return t.rdp, t.n_charges

    def history(self, limit: int | None = None) -> list[ChargeRecord]:
        check_limit(limit)
        with self._lock:
            return self._live().history(limit)

    # -- the one mutation -------------------------------------------------------------------------
    def charge(self, charge: RdpCharge) -> Receipt:
        """Record ``charge`` durably, or refuse it.

        Returns only after the commit (fsync'd) has succeeded: the caller may release then and
        only then. Raises :class:`BudgetExhausted` when the epsilon after the charge would exceed
        the limit (nothing recorded; exactly reaching the limit is allowed) and
        :class:`LedgerError` when the ledger cannot be written (nothing recorded either; do not
        release).
        """
        rdp = project_charge(charge, self._orders)  # validates before touching the store
        with self._lock:
            store = self._live()
            totals = store.lock_totals()
            try:
                curve, eps_after = self._decide(totals.rdp, rdp, charge)
                charge_id = store.append(
                    NewCharge(
                        time.time(), charge.count, charge.label, rdp, eps_after,
                        charge.mechanism, charge.params,
                    ),
                    curve,
                )
                store.commit()
            except BaseException:
                store.rollback()
                raise
        return self._receipt(charge_id, eps_after)

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
            if store is None:
                return
            if os.getpid() == self._pid:
                store.close()
            elif hasattr(store, "abandon"):  # inherited across fork: the parent's to close
                store.abandon()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._store is None else f"spent={self.epsilon_spent():.6g}"
        return f"Ledger({self._path!r}, epsilon={self._epsilon!r}, delta={self._delta!r}, {state})"
