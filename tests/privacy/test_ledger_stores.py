"""The budget policy (Ledger) over every store: one shared test class run against the SQLite
store and an in-memory fake of the store protocol (dp_accounting's habit), plus what the policy
adds over a store: the acceptance rule it records, and charges that can be replayed."""

from __future__ import annotations

import errno
import math
import os
import sqlite3
import threading

import pytest

from pmixed.errors import BudgetExhausted, ConfigError, LedgerError
from pmixed.privacy import ledger_sqlite
from pmixed.privacy.acceptance import BEST_ORDER, BestOrderRule, register_rule
from pmixed.privacy.accountant import (
    DEFAULT_ORDERS,
    RdpAccountant,
    RdpCharge,
    compose_curve,
    curve_epsilon,
)
from pmixed.privacy.conversion import epsilon_at_order
from pmixed.privacy.ledger import Ledger
from pmixed.privacy.mixture_bound import params_from_record, pmixed_charge
from pmixed.privacy.params import MechanismParams

from .memory_store import MemoryDatabase

DELTA = 1e-5
FIXED = RdpCharge(DEFAULT_ORDERS, tuple(a / 64 for a in DEFAULT_ORDERS), label="fixed")


def limit_for(k: int, charge: RdpCharge = FIXED, orders=DEFAULT_ORDERS) -> float:
    curve = (0.0,) * len(orders)
    for _ in range(k):
        curve = compose_curve(curve, charge.rdp, charge.count)
    return curve_epsilon(orders, curve, DELTA)


class FixedOrderRule:
    """A test rule: (C1) at one order only (the shape a Renyi filter would take)."""

    def __init__(self, order: float):
        self.order = float(order)
        self.name = f"test-fixed-order/{order:g}"

    def epsilon(self, orders, curve, delta):
        rho = curve[list(orders).index(self.order)]
        return 0.0 if rho == 0.0 else max(0.0, epsilon_at_order(rho, self.order, delta))

    def check_orders(self, orders):
        if self.order not in orders:
            raise ConfigError("orders", f"{self.name} needs order {self.order:g} on the grid")

    def __eq__(self, other):
        return isinstance(other, FixedOrderRule) and other.order == self.order

    def __hash__(self):
        return hash(self.name)


FIXED_8 = FixedOrderRule(8.0)
register_rule(FIXED_8)


@pytest.fixture(params=["sqlite", "memory"])
def where(request, tmp_path):
    """Where a ledger lives: a SQLite path, or an in-memory database behind the store protocol.
    Opening the same ``where`` twice reopens the same ledger."""
    if request.param == "sqlite":
        return str(tmp_path / "budget.ledger")
    return MemoryDatabase().opener()


class TestPolicyOverAnyStore:
    def test_create_charge_reopen(self, where):
        with Ledger(where, epsilon=limit_for(10), delta=DELTA) as led:
            assert led.epsilon_spent() == 0.0 and led.charges() == 0 and led.rule == BEST_ORDER
            receipts = [led.charge(FIXED) for _ in range(3)]
            assert [r.id for r in receipts] == [1, 2, 3]
            spent, curve = led.epsilon_spent(), led.spent_rdp()
            assert receipts[-1].epsilon_spent == spent and led.remaining() == receipts[-1].remaining
        assert led.closed
        with pytest.raises(LedgerError, match="closed"):
            led.charge(FIXED)
        with Ledger.open(where) as led:
            assert (led.epsilon_spent(), led.spent_rdp(), led.charges()) == (spent, curve, 3)
            assert (led.epsilon, led.delta, led.orders) == (limit_for(10), DELTA, DEFAULT_ORDERS)

    def test_refusal_records_nothing_and_exact_limit(self, where):
        with Ledger(where, epsilon=limit_for(2), delta=DELTA) as led:
            led.charge(FIXED)
            led.charge(FIXED)
            assert led.epsilon_spent() == led.epsilon and not led.can_afford(FIXED)
            curve = led.spent_rdp()
            with pytest.raises(BudgetExhausted) as info:
                led.charge(FIXED)
            assert info.value.requested == led.epsilon_if(FIXED) > led.epsilon
            assert led.spent_rdp() == curve and led.charges() == 2 and len(led.history()) == 2
            assert led.queries_left(FIXED.rdp) == 0

    def test_matches_the_accountant(self, where):
        acc = RdpAccountant(epsilon=5.0, delta=DELTA)
        with Ledger(where, epsilon=5.0, delta=DELTA) as led:
            for i, sigma in enumerate([6.0, 3.0, 9.0, 0.5]):
                c = RdpCharge(DEFAULT_ORDERS, tuple(a / (2 * sigma**2) for a in DEFAULT_ORDERS), i + 1, f"c{i}")
                assert led.epsilon_if(c) == acc.epsilon_if(c) and led.can_afford(c) == acc.can_afford(c)
                assert led.queries_left(c.rdp) == acc.queries_left(c.rdp)
                try:
                    want = acc.charge(c)
                except BudgetExhausted:
                    with pytest.raises(BudgetExhausted):
                        led.charge(c)
                else:
                    assert led.charge(c) == want
            assert led.spent_rdp() == acc.spent_rdp() and led.charges() == acc.charges()
            assert [(h.id, h.label, h.count, h.rdp) for h in led.history()] == [
                (h.id, h.label, h.count, h.rdp) for h in acc.history()
            ]
            assert [h.id for h in led.history(limit=2)] == [2, 3] and led.history(limit=0) == []
            with pytest.raises(ConfigError):
                led.history(limit=-1)

    def test_budget_and_rule_mismatch_on_reopen(self, where):
        Ledger(where, epsilon=2.0, delta=DELTA).close()
        with pytest.raises(LedgerError, match="different budget.*epsilon 3.0 was given, the file has 2.0"):
            Ledger(where, epsilon=3.0, delta=DELTA)
        with pytest.raises(LedgerError, match="orders"):
            Ledger(where, epsilon=2.0, delta=DELTA, orders=(2.0, 8.0))
        with pytest.raises(LedgerError, match="acceptance rule 'best-order'.*'test-fixed-order/8'"):
            Ledger(where, rule=FIXED_8)
        with Ledger(where, rule=BestOrderRule()) as led:  # same rule (by name): accepted
            assert led.epsilon == 2.0

    def test_the_rule_is_recorded_and_decides(self, where):
        orders = (2.0, 8.0)
        c = RdpCharge(orders, (0.05, 10.0))  # best order 2 (eps 9.5); order 8 alone gives 11.2
        limit = curve_epsilon(orders, c.total(), DELTA) * 1.1
        with Ledger(where, epsilon=limit, delta=DELTA, orders=orders, rule=FIXED_8) as led:
            assert led.rule is FIXED_8
            assert led.epsilon_if(c) == FIXED_8.epsilon(orders, c.rdp, DELTA) > limit
            with pytest.raises(BudgetExhausted):
                led.charge(c)  # the best-order rule would accept it
            assert RdpAccountant(orders, epsilon=limit, delta=DELTA).can_afford(c)
            small = RdpCharge(orders, (0.05, 0.01))
            led.charge(small)
            assert led.epsilon_spent() == FIXED_8.epsilon(orders, small.rdp, DELTA)
        with Ledger.open(where) as led:  # adopts the recorded rule
            assert led.rule == FIXED_8 and led.charges() == 1
        with pytest.raises(LedgerError, match="test-fixed-order/8.*cannot be used with the rule 'best-order'"):
            Ledger(where, rule=BEST_ORDER)

    def test_an_unknown_recorded_rule_is_refused(self, where):
        Ledger(where, epsilon=2.0, delta=DELTA, orders=(2.0, 4.0), rule=FixedOrderRule(4.0)).close()
        with pytest.raises(LedgerError, match="does not know"):
            Ledger.open(where)
        with Ledger(where, rule=FixedOrderRule(4.0)) as led:  # given explicitly: fine
            assert led.rule.name == "test-fixed-order/4"
        with pytest.raises(LedgerError, match="test-fixed-order/4.*cannot be used"):
            Ledger(where, epsilon=2.0, delta=DELTA, orders=(2.0, 4.0), rule=FIXED_8)
        with pytest.raises(ConfigError, match="order 8 on the grid"):  # a new ledger: the rule checks the grid
            Ledger(":memory:", epsilon=2.0, delta=DELTA, orders=(2.0, 4.0), rule=FIXED_8)

    def test_charges_replay_from_their_mechanism_and_params(self, where):
        ps = [
            MechanismParams(80, 0.03, 0.75, (1.34, 2.48, 5.39)),
            MechanismParams(16, 0.25, 0.5, (0.01, 0.001, 1e-4, 1e-5, 2e-6)),
        ]
        with Ledger(where, epsilon=50.0, delta=DELTA) as led:
            led.charge(pmixed_charge(ps[0], count=100, orders=led.orders, label="eval"))
            led.charge(pmixed_charge(ps[1], count=3, orders=(2.0, 3.0, 4.0)))  # projected: inf elsewhere
            led.charge(RdpCharge(DEFAULT_ORDERS, FIXED.rdp, 2, "gauss", "gaussian", {"sigma": 4.0, "sensitivity": 1}))
        with Ledger.open(where) as led:
            hist = led.history()
            assert [h.mechanism for h in hist] == ["pmixed", "pmixed", "gaussian"]
            assert hist[2].params == {"sensitivity": 1, "sigma": 4.0}
            replayed = (0.0,) * len(led.orders)
            for h in hist:
                if h.mechanism == "pmixed":
                    params = params_from_record(h.params)
                    assert params in ps
                    rdp = pmixed_charge(params, orders=led.orders).rdp
                    if params == ps[1]:  # recorded only at orders 2..4
                        rdp = tuple(r if a <= 4.0 else math.inf for a, r in zip(led.orders, rdp, strict=True))
                else:
                    sigma = h.params["sigma"]
                    rdp = tuple(a / 64 for a in led.orders) if sigma == 4.0 else None
                assert rdp == h.rdp
                replayed = compose_curve(replayed, rdp, h.count)
            assert replayed == led.spent_rdp()

    def test_threads_never_overspend(self, where):
        K = 9
        Ledger(where, epsilon=limit_for(K), delta=DELTA).close()
        leds = [Ledger.open(where) for _ in range(3)]
        ok: list[int] = []

        def hammer(led):
            for _ in range(6):
                try:
                    led.charge(FIXED)
                    ok.append(1)
                except BudgetExhausted:
                    pass

        ts = [threading.Thread(target=hammer, args=(led,)) for led in leds]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(ok) == K and all(led.charges() == K for led in leds)
        for led in leds:
            led.close()


def test_sqlite_and_memory_store_give_the_same_results(tmp_path):
    seq = [FIXED, RdpCharge(DEFAULT_ORDERS, tuple(a / 20 for a in DEFAULT_ORDERS), 3), FIXED] * 3
    out = []
    for where in (str(tmp_path / "a.ledger"), MemoryDatabase().opener()):
        got = []
        with Ledger(where, epsilon=limit_for(7), delta=DELTA) as led:
            for c in seq:
                try:
                    got.append(led.charge(c))
                except BudgetExhausted as e:
                    got.append(("refused", e.spent, e.requested))
            got.append([(h.id, h.count, h.rdp, h.epsilon_after) for h in led.history()])
            got.append((led.spent_rdp(), led.epsilon_spent(), led.queries_left(FIXED.rdp)))
        out.append(got)
    assert out[0] == out[1]
    assert any(isinstance(g, tuple) and g[0] == "refused" for g in out[0])


# --- SQLite specifics -----------------------------------------------------------------------
_V1_SCHEMA = """
CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), format TEXT NOT NULL, epsilon REAL NOT NULL,
    delta REAL NOT NULL, orders TEXT NOT NULL, created_at TEXT NOT NULL, package_version TEXT NOT NULL);
CREATE TABLE charges (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 1), label TEXT NOT NULL, rdp TEXT NOT NULL, epsilon_after REAL NOT NULL);
CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 1), rdp TEXT NOT NULL, n_charges INTEGER NOT NULL,
    last_charge_id INTEGER NOT NULL);
"""


def _write_v1_ledger(path: str, charges: int) -> tuple[float, ...]:
    """A ledger as 92fb559's code wrote it (schema 1), with ``charges`` FIXED charges."""
    import json

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA application_id = {ledger_sqlite.APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(_V1_SCHEMA)
    conn.execute(
        "INSERT INTO meta VALUES (1, ?, ?, ?, ?, '2026-01-01T00:00:00+00:00', '0.1.0')",
        (ledger_sqlite.FORMAT, limit_for(10), DELTA, json.dumps(list(DEFAULT_ORDERS))),
    )
    curve = (0.0,) * len(DEFAULT_ORDERS)
    for i in range(charges):
        curve = compose_curve(curve, FIXED.rdp, 1)
        conn.execute(
            "INSERT INTO charges (time, count, label, rdp, epsilon_after) VALUES (?, 1, 'old', ?, ?)",
            (1.0 + i, json.dumps(list(FIXED.rdp)), curve_epsilon(DEFAULT_ORDERS, curve, DELTA)),
        )
    conn.execute("INSERT INTO totals VALUES (1, ?, ?, ?)", (json.dumps(list(curve)), charges, charges))
    conn.close()
    return curve


def test_schema_1_ledger_is_upgraded_in_place(tmp_path):
    path = str(tmp_path / "old.ledger")
    curve = _write_v1_ledger(path, 2)
    with Ledger.open(path) as led:
        assert led.spent_rdp() == curve and led.charges() == 2 and led.rule == BEST_ORDER
        assert [(h.label, h.mechanism, h.params) for h in led.history()] == [("old", "", {})] * 2
        led.charge(RdpCharge(DEFAULT_ORDERS, FIXED.rdp, mechanism="gaussian", params={"sigma": 4.0}))
        assert (led.history()[-1].mechanism, led.history()[-1].params) == ("gaussian", {"sigma": 4.0})
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == ledger_sqlite.SCHEMA_VERSION
        assert conn.execute("SELECT rule FROM meta").fetchone()[0] == "best-order"
    finally:
        conn.close()
    with Ledger.open(path) as led:  # and reopens as version 2
        assert led.charges() == 3


def _no_hard_links(monkeypatch, barrier: threading.Barrier | None = None):
    def link(src, dst, *a, **k):
        if barrier is not None:
            barrier.wait(10)
        raise PermissionError(errno.EPERM, "Operation not permitted (test: no hard links)", dst)

    monkeypatch.setattr(os, "link", link)


def test_creation_without_hard_links_never_replaces_a_ledger(tmp_path, monkeypatch):
    """Two creators race on a filesystem without hard links. The first rename is slow and a
    second rename (if any) waits until the first creator has charged: a creator that renamed
    after checking that the path was free would replace a ledger that already holds a charge
    (92fb559's lexists-then-rename did)."""
    path = str(tmp_path / "budget.ledger")
    _no_hard_links(monkeypatch, threading.Barrier(2))
    real_rename = os.rename
    renames: list[str] = []
    first_charged = threading.Event()

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 1:
            threading.Event().wait(0.3)  # both creators are past any free-path check by now
        else:
            first_charged.wait(10)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    leds: list[Ledger] = []
    errors: list[BaseException] = []

    def create():
        try:
            led = Ledger(path, epsilon=limit_for(10), delta=DELTA)
            led.charge(FIXED)
            first_charged.set()
            leds.append(led)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=create) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors, errors
    assert renames == [path]  # one creator won; the other opened its ledger
    assert [led.charges() for led in leds] == [2, 2]
    for led in leds:
        led.close()
    assert sorted(os.listdir(tmp_path)) == ["budget.ledger"]  # no temporary or claim file left
    with Ledger.open(path) as led:
        assert led.charges() == 2


def test_creation_without_hard_links_reports_a_stale_claim(tmp_path, monkeypatch):
    path = str(tmp_path / "budget.ledger")
    _no_hard_links(monkeypatch)
    monkeypatch.setattr(ledger_sqlite, "CLAIM_TIMEOUT_S", 0.2)
    claim = tmp_path / ".budget.ledger.creating"
    claim.write_bytes(b"")
    with pytest.raises(LedgerError, match="claim file"):
        Ledger(path, epsilon=1.0, delta=DELTA)
    assert not os.path.exists(path)
    claim.unlink()
    with Ledger(path, epsilon=1.0, delta=DELTA) as led:  # without the claim: created by rename
        led.charge(FIXED)
    assert sorted(os.listdir(tmp_path)) == ["budget.ledger"]


def test_the_policy_has_no_test_hook():
    assert not [n for n in vars(Ledger) if "hook" in n]


def test_ledger_modules_are_stdlib_only():
    import subprocess
    import sys

    code = (
        "import sys, pmixed.privacy.ledger, pmixed.privacy.ledger_sqlite, pmixed.privacy.ledger_store, "
        "pmixed.privacy.acceptance, pmixed.privacy.accountant; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    mods = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert not {"torch", "numpy", "transformers"} & mods
