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

import dataclasses
import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from fractions import Fraction

from pmixed.errors import ConfigError, LedgerError
from pmixed.privacy.acceptance import BEST_ORDER, AcceptanceRule, check_rule, rule_named
from pmixed.privacy.accountant import (
    DEFAULT_ORDERS,
    UNLIMITED,
    Budget,
    ChargeRecord,
    RdpCharge,
    Receipt,
    check_limit,
    check_orders,
    compose_curve,
    compose_curve_nearest,
    project_charge,
    queries_left,
)
from pmixed.privacy.conversion import check_delta, check_epsilon
from pmixed.privacy.ledger_pg import PostgresLedgerStore, is_postgres_url, parse_url
from pmixed.privacy.ledger_sqlite import (
    APPLICATION_ID,
    FORMAT,
    MEMORY,
    SCHEMA_VERSION,
    SqliteLedgerStore,
    new_meta,
)
from pmixed.privacy.ledger_store import LedgerMeta, LedgerStore, NewCharge, StoreOpener
from pmixed.privacy.rounding import ceil_float, floor_float

__all__ = [
    "APPLICATION_ID",
    "FORMAT",
    "MEMORY",
    "REFUND",
    "SCHEMA_VERSION",
    "ChargeRecord",
    "Ledger",
    "LedgerStore",
    "Receipt",
    "Reservation",
    "StoreOpener",
    "net_count",
    "record_count",
]

#: The ``mechanism`` of a refund record (written by :meth:`Reservation.close`; reserved:
#: :meth:`Ledger.charge` and :meth:`Ledger.reserve` refuse charges that claim it).
REFUND = "pmixed/refund"


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
        opener: StoreOpener
        if callable(where):
            opener = where
        elif is_postgres_url(where):
            opener = PostgresLedgerStore.opener(where)  # psycopg is imported when it connects
        else:
            opener = SqliteLedgerStore.opener(where)
        label = repr(where) if callable(where) else (
            parse_url(where)[3] if is_postgres_url(where) else os.fspath(where)
        )

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
        """Replay the history and compare with the totals (refund records are checked against
        the reservation they refund and replayed by :func:`_sub_up`). Charges compose rounded up
        (``compose_curve``); ledgers written before that composed them to nearest, and one
        history may hold both, so the totals must lie between the two replays, order by order
        (both roundings are monotone, so every mix of them does): exact for a history written by
        this pmixed alone, a few units in the last place wide for an older one."""
        path = self._path
        totals, records = self._live().snapshot()
        curve = low = (0.0,) * len(self._orders)
        last_id, last_eps = 0, 0.0
        charges: dict[int, ChargeRecord] = {}
        refunded: dict[int, int] = {}
        after: dict[int, tuple[float, ...]] = {}  # a grant's id -> the totals just after it
        for rec in records:
            if isinstance(rec.count, bool) or not isinstance(rec.count, int) or rec.count < 1:
                raise LedgerError(f"ledger {path} is damaged: charge {rec.id} has count {rec.count!r}")
            if rec.mechanism == REFUND:
                ref = rec.params.get("refund_of")
                _check_refund(path, rec, charges, refunded, after.get(ref) if isinstance(ref, int) else None)
                curve, low = _sub_up(curve, rec.rdp), _sub_up(low, rec.rdp)
            else:
                charges[rec.id] = rec
                curve = compose_curve(curve, rec.rdp, rec.count)
                after[rec.id] = curve
                low = compose_curve_nearest(low, rec.rdp, rec.count)
            last_id, last_eps = rec.id, rec.epsilon_after
        count = len(records)
        within = len(totals.rdp) == len(curve) and all(
            lo <= t <= hi or (math.isinf(t) and math.isinf(hi)) for lo, t, hi in zip(low, totals.rdp, curve)
        )
        if not within or count != totals.n_charges or last_id != totals.last_charge_id:
            raise LedgerError(
                f"ledger {path} is inconsistent (tampered or partially corrupt): the totals row "
                f"({totals.n_charges} charges, last id {totals.last_charge_id}) does not equal the "
                f"sum of the {count} charges recorded (last id {last_id})"
            )
        eps = self._rule.epsilon(self._orders, totals.rdp, self._delta)
        # an older pmixed converted (C1) to nearest: its last epsilon_after may sit a few units in
        # the last place below today's rounded-up conversion of the same totals
        if count and not (last_eps == eps or eps - _OLD_ROUNDING * (1.0 + abs(eps)) <= last_eps < eps):
            raise LedgerError(
                f"ledger {path} is inconsistent (tampered or partially corrupt): the last charge "
                f"(id {last_id}) records epsilon_after={last_eps!r}, the totals give {eps!r}"
            )
        if not eps <= self._epsilon + _OLD_ROUNDING * (1.0 + self._epsilon):  # (at the limit under the old rounding)
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
        _not_a_refund(charge)
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

    # -- reservations -----------------------------------------------------------------------------
    def reserve(self, charge: RdpCharge, up_to: int) -> Reservation:
        """Pay in advance for up to ``up_to`` queries of the per-query ``charge`` (count 1).

        One write transaction: under the store's lock, the largest k <= ``up_to`` such that k
        more queries fit the acceptance rule (k + 1 do not, or k = ``up_to``) is computed from
        the locked totals and a charge of k queries (the charge's label, mechanism and params,
        count k) is committed durably before this returns. k may be 0: nothing is recorded.
        The returned :class:`Reservation` hands the k queries out with :meth:`Reservation.take`
        (no I/O) and refunds the untaken ones on :meth:`Reservation.close`. Release a token only
        after its ``take()`` returned True. Raises :class:`LedgerError` when the ledger cannot be
        written (nothing granted).
        """
        if isinstance(up_to, bool) or not isinstance(up_to, int) or up_to < 0:
            raise ConfigError("up_to", f"must be an integer >= 0, got {up_to!r}")
        rdp = project_charge(charge, self._orders)
        if charge.count != 1:
            raise ConfigError(
                "count", f"reserve() takes the per-query charge (count 1) and up_to queries; got count {charge.count}"
            )
        _not_a_refund(charge)
        up_to = min(up_to, UNLIMITED)
        if up_to == 0:
            self._live()
            return Reservation(self, None, 0, rdp, (), None)
        orders, rule, delta, limit = self._orders, self._rule, self._delta, self._epsilon
        with self._lock:
            store = self._live()
            totals = store.lock_totals()
            try:
                spent = totals.rdp

                def affords(k: int) -> bool:
                    if k > up_to:
                        return False
                    return rule.epsilon(orders, spent if k == 0 else compose_curve(spent, rdp, k), delta) <= limit

                k = up_to if affords(up_to) else queries_left(affords)
                if k == 0:
                    store.rollback()
                    return Reservation(self, None, 0, rdp, (), None)
                curve, eps_after = self._decide(spent, rdp, dataclasses.replace(charge, count=k))
                charge_id = store.append(
                    NewCharge(time.time(), k, charge.label, rdp, eps_after, charge.mechanism, charge.params),
                    curve,
                )
                store.commit()
            except BaseException:
                store.rollback()
                raise
        # What this charge added to the totals, exactly (the refund never removes more).
        added = tuple(
            None if math.isinf(after) or math.isinf(before) else Fraction(after) - Fraction(before)
            for before, after in zip(spent, curve, strict=True)
        )
        return Reservation(self, charge_id, k, rdp, added, self._receipt(charge_id, eps_after), charge.label)

    def _refund(self, res: Reservation, used: int) -> Receipt:
        """Commit the refund record of ``res`` (``res.granted - used`` queries) in one
        transaction."""
        removed = res._removal(used)
        params = {"refund_of": res.charge_id, "queries": res.granted - used, "granted": res.granted, "used": used}
        with self._lock:
            store = self._live()
            totals = store.lock_totals()
            try:
                curve = _sub_up(totals.rdp, removed)
                eps_after = self._rule.epsilon(self._orders, curve, self._delta)
                charge_id = store.append(
                    NewCharge(time.time(), 1, res.label, removed, eps_after, REFUND, params), curve
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


class Reservation:
    """Queries paid for in advance by :meth:`Ledger.reserve`, handed out without I/O.

    ``granted`` queries were charged durably when the reservation was made. :meth:`take` hands
    out ``n`` of them (a local counter under a lock: no I/O); it returns False, taking none, when
    fewer than ``n`` are left or the reservation is closed. Release a token only after ``take``
    returned True. :meth:`close` (idempotent; also on leaving a ``with`` block) commits, in one
    transaction, a refund record of the ``granted - used`` queries not taken, so that the budget
    spent afterwards is what the taken queries cost (never less: the refund removes at most
    ``granted - used`` times the per-query curve and at most what the grant added minus
    ``used`` times the curve, computed exactly, and the new totals are rounded up). A process that
    dies before ``close`` leaves the whole grant charged: budget wasted, never a token released
    uncharged. Orders where the per-query curve or the spent curve is inf are not refunded.

    The refund record: ``mechanism`` :data:`REFUND`, ``count`` 1, ``rdp`` the curve removed from
    the totals, ``label`` the reservation's, ``params`` ``{"refund_of": <the grant's charge id>,
    "queries": granted - used, "granted": ..., "used": ...}``. A reservation belongs to the
    process that made it (``take`` refuses after a fork).
    """

    def __init__(self, ledger: Ledger, charge_id: int | None, granted: int, rdp: tuple[float, ...],
                 added: tuple[Fraction | None, ...], receipt: Receipt | None, label: str = ""):
        self._ledger = ledger
        self._charge_id = charge_id
        self._granted = granted
        self._rdp = rdp
        self._added = added
        self._receipt = receipt
        self._refund_receipt: Receipt | None = None
        self.label = label
        self._used = 0
        self._state = "open" if granted else "closed"  # open -> closing -> closed
        self._lock = threading.Lock()
        self._closing = threading.Lock()
        self._pid = os.getpid()

    @property
    def granted(self) -> int:
        """How many queries were charged for this reservation (0: none, nothing recorded)."""
        return self._granted

    @property
    def used(self) -> int:
        """How many queries :meth:`take` has handed out."""
        return self._used

    @property
    def remaining(self) -> int:
        return self._granted - self._used if self._state == "open" else 0

    @property
    def charge_id(self) -> int | None:
        """The id of the grant's charge record (None when nothing was granted)."""
        return self._charge_id

    @property
    def receipt(self) -> Receipt | None:
        """The grant's receipt (None when nothing was granted)."""
        return self._receipt

    @property
    def refund(self) -> Receipt | None:
        """The refund record's receipt, once :meth:`close` has written one."""
        return self._refund_receipt

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def take(self, n: int = 1) -> bool:
        """Hand out ``n`` of the granted queries (all or none); False when fewer are left or the
        reservation is closed (or closing)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("n", f"must be an integer >= 1, got {n!r}")
        if os.getpid() != self._pid:
            raise LedgerError(
                f"this reservation was made in process {self._pid}; a forked process must reserve its own"
            )
        with self._lock:
            if self._state != "open" or self._used + n > self._granted:
                return False
            self._used += n
            return True

    def close(self) -> Receipt | None:
        """Stop handing out queries and refund the untaken ones (one transaction); returns the
        refund's receipt, or None when there was nothing to refund. Idempotent. If the refund
        cannot be written (:class:`LedgerError`), the untaken queries stay charged and a later
        ``close()`` tries again."""
        with self._closing:  # one refund, however many threads close at once
            with self._lock:
                if self._state == "closed":
                    return self._refund_receipt
                self._state = "closing"
                used = self._used
            if used == self._granted or os.getpid() != self._pid:
                # nothing to refund; or a forked copy: the grant is the parent's to refund
                self._state = "closed"
                return None
            self._refund_receipt = self._ledger._refund(self, used)
            self._state = "closed"
            return self._refund_receipt

    def _removal(self, used: int) -> tuple[float, ...]:
        """The curve to remove from the totals: per order, the largest float <= min((granted -
        used) * rdp, added - used * rdp), exactly; 0 where rdp is 0 or inf or the grant's
        contribution is not finite."""
        n = self._granted - used
        out = []
        for r, added in zip(self._rdp, self._added, strict=True):
            if r == 0.0 or added is None or math.isinf(r):
                out.append(0.0)
                continue
            fr = Fraction(r)
            # nothing used: all the grant added (its rounding up included), so that a request
            # refused before its first token leaves the totals where they were; else at most the
            # untaken queries' cost, leaving at least the used ones' exact cost
            bound = added if used == 0 else min(n * fr, added - used * fr)
            out.append(floor_float(bound) if bound > 0 else 0.0)
        return tuple(out)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Reservation(granted={self._granted}, used={self._used}, {self._state})"


def record_count(rec: ChargeRecord) -> int:
    """The queries a history record adds: its count for a charge, minus the refunded queries for
    a refund record (:data:`REFUND`)."""
    if rec.mechanism == REFUND:
        return -int(rec.params.get("queries", 0))
    return rec.count


def net_count(records: Iterable[ChargeRecord]) -> int:
    """The queries charged by a history, net of refunds (what was handed out, when every
    reservation was closed)."""
    return sum(record_count(r) for r in records)


def _not_a_refund(charge: RdpCharge) -> None:
    if charge.mechanism == REFUND:
        raise ConfigError("mechanism", f"{REFUND!r} is reserved for the ledger's refund records")


#: How far below today's rounded-up arithmetic an older pmixed's round-to-nearest (C1) could land
#: (1e-12 relative: over a thousand times its rounding error); used to reopen its ledgers only.
_OLD_ROUNDING = 1e-12


def _sub_up(spent: Sequence[float], removed: Sequence[float]) -> tuple[float, ...]:
    """``spent - removed`` order by order, rounded up (never below the exact difference, never
    below 0); inf stays inf. Deterministic, so a replay reproduces the totals bit for bit."""
    if len(spent) != len(removed):
        raise ValueError("curves must have the same length")
    out = []
    for s, d in zip(spent, removed, strict=True):
        if d == 0.0 or math.isinf(s):
            out.append(s)
        elif math.isinf(d):
            raise ValueError("a refund cannot remove an infinite amount")
        else:
            out.append(max(0.0, ceil_float(Fraction(s) - Fraction(d))))
    return tuple(out)


def _whole_refund_slack(grant: ChargeRecord, queries: int, refunded: dict[int, int],
                        after: Sequence[float] | None) -> list[Fraction]:
    """Per order, what a refund may remove beyond ``queries`` x the grant's curve: two units in the
    last place of the totals just after the grant when it refunds the whole grant at once, else 0."""
    if after is None or queries != grant.count or refunded.get(grant.id):
        return [Fraction(0)] * len(grant.rdp)
    return [Fraction(2 * math.ulp(a)) if math.isfinite(a) else Fraction(0) for a in after]


def _check_refund(path: str, rec: ChargeRecord, charges: dict[int, ChargeRecord], refunded: dict[int, int],
                  after: Sequence[float] | None = None) -> None:
    """A refund record must refund an earlier grant, no more queries than it granted (over all
    its refunds), and remove at most that many times the grant's per-query curve; a refund of
    the whole grant at once may also remove what rounding up added to it (two units in the last
    place of the totals just after the grant, ``after``)."""
    params = rec.params
    ref = params.get("refund_of")
    queries = params.get("queries")
    grant = charges.get(ref) if isinstance(ref, int) and not isinstance(ref, bool) else None
    why = ""
    if grant is None:
        why = f"it refunds {ref!r}, which is not an earlier charge"
    elif isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        why = f"it refunds {queries!r} queries"
    elif refunded.get(ref, 0) + queries > grant.count:
        why = f"charge {ref} granted {grant.count} queries, more than that are refunded"
    elif rec.count != 1 or any(math.isinf(d) for d in rec.rdp):
        why = "its count or curve is malformed"
    elif any(d > 0.0 and Fraction(d) > queries * Fraction(r) + slack
             for d, r, slack in zip(rec.rdp, grant.rdp, _whole_refund_slack(grant, queries, refunded, after),
                                    strict=True)):
        why = f"it removes more than {queries} queries of charge {ref} cost"
    if why:
        raise LedgerError(f"ledger {path} is inconsistent (tampered or partially corrupt): refund record {rec.id} is invalid: {why}")
    refunded[ref] = refunded.get(ref, 0) + queries
