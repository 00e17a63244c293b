"""API keys for the server: created with the OS CSPRNG, stored hashed in a small SQLite file, each
with a token quota per window so that no single client can spend the deployment's shared budget.

A key reads ``pmx-<id>-<secret>``: ``id`` (8 hex characters) names the key in listings and logs;
``secret`` is 32 random bytes (``secrets.token_urlsafe``). The file keeps only the SHA-256 of the
whole key: a key carries 256 bits of entropy, so a slow password hash (scrypt) would add nothing
against guessing, and a fast hash keeps the per-request check cheap. The comparison is constant
time (``hmac.compare_digest``). The secret is shown once, by ``pmixed keys create``.

Quota: at most ``quota`` private (charged) tokens per ``period`` seconds per key (``quota`` None:
no limit). A request reserves ``n * max_tokens`` when it is admitted and gives back what it did
not use when it ends (:meth:`KeyStore.reserve` / :meth:`KeyStore.settle`), so concurrent requests
of one key cannot overshoot. A request that does not fit is refused (HTTP 429) with the seconds
until the window rolls over. Admin keys may also call the budget operations (key listing, quota
resets, /metrics). The file is not a privacy ledger: losing it loses quotas, never the budget.

Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pmixed.errors import ConfigError, PMixEDError

__all__ = ["DEFAULT_PERIOD", "DEFAULT_QUOTA", "KeyInfo", "KeyStore", "KeyStoreError", "QuotaExceeded"]

DEFAULT_QUOTA = 10_000  # private tokens per key per window
DEFAULT_PERIOD = 86_400  # seconds (one day)
_APP_ID = 0x504D584B  # "PMXK": this file is a pmixed key store
_KEY_RE = re.compile(r"^pmx-([0-9a-f]{8})-([A-Za-z0-9_\-]{20,})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    quota INTEGER,
    period INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    window_start REAL NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


class KeyStoreError(PMixEDError):
    """The key file is missing, foreign or corrupt, or a key named does not exist."""

    exit_code = 2


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    admin: bool
    quota: int | None  # private tokens per window; None: unlimited
    period: int  # seconds
    used: int  # tokens used (and reserved) in the current window
    window_start: float
    created_at: float
    revoked: bool

    def public(self) -> dict:
        """What a listing shows: never the hash."""
        return {"id": self.id, "name": self.name, "admin": self.admin, "quota": self.quota,
                "period_s": self.period, "used": self.used,
                "window_resets_in_s": max(0, int(self.window_start + self.period - time.time())),
                "created_at": int(self.created_at), "revoked": self.revoked}


class QuotaExceeded(Exception):
    """A request's reservation does not fit the key's quota in this window."""

    def __init__(self, key: KeyInfo, wanted: int, retry_after: int):
        self.key, self.wanted, self.retry_after = key, wanted, retry_after
        left = max(0, (key.quota or 0) - key.used)
        if key.quota is not None and wanted > key.quota:
            msg = (f"this request may use up to {wanted} tokens (n * max_tokens) but the key's quota "
                   f"is {key.quota} tokens per {key.period} s; lower max_tokens or n")
        else:
            msg = (f"the key's token quota is used up for now ({left} of {key.quota} tokens left in "
                   f"this window, this request may use up to {wanted}); retry in {retry_after} s")
        super().__init__(msg)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _row(r) -> KeyInfo:
    return KeyInfo(id=r[0], name=r[1], admin=bool(r[3]), quota=r[4], period=r[5], used=r[6],
                   window_start=r[7], created_at=r[8], revoked=r[9] is not None)


class KeyStore:
    """The API keys of one deployment, in a SQLite file (created on first use)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 clock=time.time):
        self.path = Path(path)
        self._clock = clock
        if not self.path.exists() and not create:
            raise KeyStoreError(f"no key file at {self.path}: create a key with "
                                f"`pmixed keys create NAME --keys {self.path}`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10,
                                       isolation_level=None)
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if app_id == 0 and not tables:
                self._db.execute(f"PRAGMA application_id = {_APP_ID}")
                self._db.executescript(_SCHEMA)
            elif app_id != _APP_ID or "keys" not in tables:
                raise KeyStoreError(f"{self.path} is not a pmixed key file")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as err:
            raise KeyStoreError(f"{self.path} is not a pmixed key file ({err})") from err
        if os.name == "posix":
            try:
                os.chmod(self.path, 0o600)
            except OSError:
                pass

    # ---- administration (the CLI)
    def create(self, name: str, *, admin: bool = False, quota: int | None = DEFAULT_QUOTA,
               period: int = DEFAULT_PERIOD) -> tuple[KeyInfo, str]:
        """A new key: (its record, the key itself; shown once, never stored)."""
        if not name or len(name) > 100:
            raise ConfigError("name", "a key needs a name of 1 to 100 characters")
        if quota is not None and quota < 1:
            raise ConfigError("quota", "must be >= 1 token (or no quota)")
        if period < 1:
            raise ConfigError("period", "must be >= 1 second")
        with self._lock:
            while True:
                kid = secrets.token_hex(4)
                if not self._db.execute("SELECT 1 FROM keys WHERE id=?", (kid,)).fetchone():
                    break
            secret = f"pmx-{kid}-{secrets.token_urlsafe(32)}"
            now = self._clock()
            self._db.execute(
                "INSERT INTO keys (id, name, hash, admin, quota, period, used, window_start, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (kid, name, _hash(secret), int(admin), quota, period, now, now))
        return self.get(kid), secret

    def list(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM keys ORDER BY created_at").fetchall()
        return [self._rolled(_row(r)) for r in rows]

    def get(self, id_or_name: str) -> KeyInfo:
        with self._lock:
            rows = self._db.execute("SELECT * FROM keys WHERE id=? OR name=?",
                                    (id_or_name, id_or_name)).fetchall()
        if not rows:
            raise KeyStoreError(f"no key with id or name {id_or_name!r}")
        if len(rows) > 1:
            raise KeyStoreError(f"several keys are named {id_or_name!r}: give the id")
        return self._rolled(_row(rows[0]))

    def revoke(self, id_or_name: str) -> KeyInfo:
        key = self.get(id_or_name)
        with self._lock:
            self._db.execute("UPDATE keys SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                             (self._clock(), key.id))
        return self.get(key.id)

    def reset(self, id_or_name: str) -> KeyInfo:
        """Start a new quota window for a key now (an admin operation)."""
        key = self.get(id_or_name)
        with self._lock:
            self._db.execute("UPDATE keys SET used=0, window_start=? WHERE id=?", (self._clock(), key.id))
        return self.get(key.id)

    def active_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL").fetchone()[0]

    # ---- the server
    def authenticate(self, key: str | None) -> KeyInfo | None:
        """The live key ``key`` names, or None (unknown, malformed or revoked)."""
        if not key:
            return None
        m = _KEY_RE.match(key)
        if m is None:
            return None
        with self._lock:
            r = self._db.execute("SELECT * FROM keys WHERE id=?", (m.group(1),)).fetchone()
        if r is None or not hmac.compare_digest(r[2], _hash(key)) or r[9] is not None:
            return None
        return self._rolled(_row(r))

    def reserve(self, key_id: str, tokens: int) -> KeyInfo:
        """Reserve ``tokens`` of the key's quota (atomically, across processes), or QuotaExceeded."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                r = self._db.execute("SELECT * FROM keys WHERE id=?", (key_id,)).fetchone()
                info = self._roll_locked(_row(r))
                if info.quota is not None and info.used + tokens > info.quota:
                    retry = max(1, int(info.window_start + info.period - self._clock()) + 1)
                    raise QuotaExceeded(info, tokens, retry)
                self._db.execute("UPDATE keys SET used=used+? WHERE id=?", (tokens, key_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return info

    def settle(self, key_id: str, reserved: int, used: int, window_start: float) -> None:
        """Give back ``reserved - used`` tokens of a reservation made in the window that began at
        ``window_start`` (nothing to give back when the window has rolled over since)."""
        back = max(0, reserved - used)
        if back == 0:
            return
        with self._lock:
            self._db.execute("UPDATE keys SET used=MAX(0, used-?) WHERE id=? AND window_start=?",
                             (back, key_id, window_start))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- windows
    def _rolled(self, info: KeyInfo) -> KeyInfo:
        now = self._clock()
        if now < info.window_start + info.period:
            return info
        return KeyInfo(**{**info.__dict__, "used": 0, "window_start": now})

    def _roll_locked(self, info: KeyInfo) -> KeyInfo:
        new = self._rolled(info)
        if new is not info:
            self._db.execute("UPDATE keys SET used=0, window_start=? WHERE id=?", (new.window_start, info.id))
        return new
