"""API keys: CSPRNG keys stored hashed, revocation, per-key token quota windows."""

from __future__ import annotations

import sqlite3

import pytest

from pmixed.serve.keys import KeyStore, KeyStoreError, QuotaExceeded


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_keys_are_random_and_stored_hashed(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    a, ka = store.create("alice")
    b, kb = store.create("bob", admin=True, quota=None)
    assert ka != kb and ka.startswith(f"pmx-{a.id}-") and len(ka) > 40
    raw = (tmp_path / "keys.db").read_bytes()
    assert ka.encode() not in raw and kb.encode() not in raw  # only hashes on disk
    assert store.authenticate(ka) == store.get(a.id)
    assert store.authenticate(kb).admin and not store.authenticate(ka).admin
    assert store.authenticate(ka[:-1] + ("A" if ka[-1] != "A" else "B")) is None
    assert store.authenticate("") is None and store.authenticate("nonsense") is None
    assert store.authenticate(f"pmx-{a.id}-" + "x" * 43) is None  # right id, wrong secret
    assert "hash" not in a.public()
    store.revoke("alice")
    assert store.authenticate(ka) is None and store.get(a.id).revoked
    assert store.active_count() == 1
    store.close()
    again = KeyStore(tmp_path / "keys.db", create=False)  # durable
    assert again.authenticate(kb) is not None and [k.name for k in again.list()] == ["alice", "bob"]


def test_foreign_or_missing_files_are_refused(tmp_path):
    with pytest.raises(KeyStoreError, match="no key file"):
        KeyStore(tmp_path / "absent.db", create=False)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(KeyStoreError, match="not a pmixed key file"):
        KeyStore(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(KeyStoreError, match="not a pmixed key file"):
        KeyStore(junk)
    store = KeyStore(tmp_path / "k.db")
    with pytest.raises(KeyStoreError, match="no key"):
        store.revoke("nobody")


def test_quota_reserve_settle_and_window(tmp_path):
    clock = Clock()
    store = KeyStore(tmp_path / "keys.db", clock=clock)
    k, _ = store.create("c", quota=10, period=60)
    info = store.reserve(k.id, 8)
    with pytest.raises(QuotaExceeded) as ex:  # 8 reserved, 4 more do not fit
        store.reserve(k.id, 4)
    assert ex.value.retry_after == 61 and "retry in 61 s" in str(ex.value)
    store.settle(k.id, reserved=8, used=3, window_start=info.window_start)  # 5 come back
    assert store.get(k.id).used == 3
    store.reserve(k.id, 7)
    with pytest.raises(QuotaExceeded, match="quota is 10 tokens per 60 s"):
        store.reserve(k.id, 11)  # never fits
    clock.t += 61  # a new window
    assert store.get(k.id).used == 0
    info2 = store.reserve(k.id, 10)
    store.settle(k.id, reserved=7, used=0, window_start=info.window_start)  # stale window: nothing back
    assert store.get(k.id).used == 10
    store.settle(k.id, reserved=10, used=10, window_start=info2.window_start)
    store.reset(k.id)
    assert store.get(k.id).used == 0
    unl, _ = store.create("u", quota=None)
    store.reserve(unl.id, 10**9)
