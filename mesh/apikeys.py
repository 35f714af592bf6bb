"""API keys of clients and operators: made once, stored hashed, checked in constant time.

A key reads ``llk_<id>_<secret>``: the id (12 hex digits) finds the record and is the key's
fingerprint in logs and listings; the secret (43 random letters and digits, 256 bits, so a
double-click selects the whole key and no ``_`` or ``-`` can blur the separators) is never
stored, only its SHA-256 (a fast hash suffices for 256 random bits; there is nothing to
guess). A key carries a tenant, a role (``client`` or ``operator``), an optional allow-list
of model ids and an optional rate limit in tasks per second.

The store is one SQLite file (WAL) beside the orchestrator's journal. ``llorch keys`` writes it
directly on the orchestrator's machine; the orchestrator reads it and notices every change
within ``refresh_s`` (SQLite's ``data_version``), so a revoked key stops working without a
restart, and the streams it opened end (mesh.auth, mesh.interceptors).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mesh.ids import is_valid_name

KEY_ROLES = ("client", "operator")
_SECRET_ALPHABET = string.ascii_letters + string.digits
_SECRET_LEN = 43  # 43 * log2(62) > 256 bits
_KEY_RE = re.compile(r"llk_([0-9a-f]{12})_([A-Za-z0-9]{43})")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    tenant TEXT NOT NULL,
    role TEXT NOT NULL,
    models TEXT NOT NULL,
    rate_per_s REAL NOT NULL,
    description TEXT NOT NULL,
    created_unix_s REAL NOT NULL,
    revoked_unix_s REAL
);
"""


class ApiKeyError(ValueError):
    """A key could not be made or changed; the message names the option."""


@dataclass(frozen=True)
class ApiKey:
    """A key's record (never its secret)."""

    key_id: str
    tenant: str
    role: str
    models: tuple[str, ...]
    """Model ids the key may use; empty: all."""
    rate_per_s: float
    """Tasks per second the key may submit; 0: no limit."""
    description: str
    created_unix_s: float
    revoked_unix_s: float | None

    @property
    def fingerprint(self) -> str:
        """What logs and listings show of the key."""
        return f"llk_{self.key_id}"

    @property
    def revoked(self) -> bool:
        return self.revoked_unix_s is not None


class ApiKeyStore:
    """The key file. Safe to share between threads; each process opens its own."""

    def __init__(self, path: Path, refresh_s: float = 0.5) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        # Made owner-only before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        self._keys: dict[str, tuple[str, ApiKey]] = {}
        self._version = -1
        self._dirty = True
        self._checked_at = float("-inf")
        self._generation = 0
        self._reload()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def create(
        self,
        tenant: str,
        role: str = "client",
        models: tuple[str, ...] = (),
        rate_per_s: float = 0.0,
        description: str = "",
    ) -> tuple[str, ApiKey]:
        """Makes a key; returns the key itself (shown once, never stored) and its record."""
        if not is_valid_name(tenant):
            raise ApiKeyError(f"--tenant {tenant!r} must be a name like a model id")
        if role not in KEY_ROLES:
            raise ApiKeyError(f"--role must be one of {', '.join(KEY_ROLES)}")
        for model_id in models:
            if not is_valid_name(model_id):
                raise ApiKeyError(f"--models: {model_id!r} is not a model id")
        if not 0 <= rate_per_s <= 1_000_000:
            raise ApiKeyError("--rate must be between 0 (no limit) and 1000000 tasks/s")
        key_id = secrets.token_hex(6)
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LEN))
        record = ApiKey(
            key_id=key_id,
            tenant=tenant,
            role=role,
            models=tuple(sorted(set(models))),
            rate_per_s=rate_per_s,
            description=description[:200],
            created_unix_s=time.time(),
            revoked_unix_s=None,
        )
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    key_id,
                    _hash(secret),
                    tenant,
                    role,
                    json.dumps(list(record.models)),
                    rate_per_s,
                    record.description,
                    record.created_unix_s,
                ),
            )
            self._dirty = True
        return f"llk_{key_id}_{secret}", record

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with self._lock:
            self._reload()
            return sorted((k for _, k in self._keys.values()), key=lambda k: k.created_unix_s)

    def revoke(self, key_id: str) -> ApiKey:
        """Revokes a key by its id (with or without ``llk_``); ApiKeyError when unknown."""
        key_id = key_id.removeprefix("llk_")
        with self._lock:
            self._conn.execute(
                "UPDATE api_keys SET revoked_unix_s = ?"
                " WHERE key_id = ? AND revoked_unix_s IS NULL",
                (time.time(), key_id),
            )  # revoking a revoked key is not an error: it stays revoked since the first time
            self._dirty = True
            self._reload()
            found = self._keys.get(key_id)
        if found is None:
            raise ApiKeyError(f"no key llk_{key_id}")
        return found[1]

    def verify(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` is, or None (unknown, malformed, wrong secret, revoked).

        The secret's hash is compared in constant time, and a key of an unknown id costs the
        same comparison, so timing tells nothing about the secret. (Whether an id exists may
        show: an unknown one also costs a look at the file's version.)
        """
        match = _KEY_RE.fullmatch(presented)
        with self._lock:
            self._reload_if_due()
            found = self._keys.get(match[1]) if match else None
            if found is None and match:
                # A key made a moment ago: the file's version says whether to read it again
                # (one cheap PRAGMA, so unknown ids cannot make the store re-read everything).
                self._reload()
                found = self._keys.get(match[1])
        digest = _hash(match[2]) if match else _DUMMY_HASH
        stored, key = found if found is not None else (_DUMMY_HASH, None)
        if not hmac.compare_digest(digest, stored) or key is None or key.revoked:
            return None
        return key

    def is_revoked(self, key_id: str) -> bool:
        """Whether the key ``key_id`` is revoked (or gone), as the file reads now (within
        ``refresh_s``)."""
        with self._lock:
            self._reload_if_due()
            found = self._keys.get(key_id)
        return found is None or found[1].revoked

    def generation(self) -> int:
        """A number that moves each time the records are read again after a change (within
        ``refresh_s`` of it): a key may have been revoked."""
        with self._lock:
            self._reload_if_due()
            return self._generation

    def _reload_if_due(self) -> None:
        now = time.monotonic()
        if now - self._checked_at >= self._refresh_s:
            self._checked_at = now
            self._reload()

    def _reload(self) -> None:
        """Reads every record again if the file changed since the last read (lock held)."""
        # data_version moves when another connection (``llorch keys``) committed; this
        # connection's own writes set _dirty.
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version and not self._dirty:
            return
        self._version, self._dirty = version, False
        self._generation += 1
        keys = {}
        for row in self._conn.execute("SELECT * FROM api_keys"):
            keys[row[0]] = (
                row[1],
                ApiKey(
                    key_id=row[0],
                    tenant=row[2],
                    role=row[3],
                    models=tuple(json.loads(row[4])),
                    rate_per_s=row[5],
                    description=row[6],
                    created_unix_s=row[7],
                    revoked_unix_s=row[8],
                ),
            )
        self._keys = keys


class RateLimiter:
    """Token buckets per key: ``rate_per_s`` tasks per second, bursts up to one second's worth
    (at least one task)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id → (tokens, at)

    @staticmethod
    def burst(key: ApiKey) -> float:
        """Most tasks the key may submit at once (one second's worth, at least one)."""
        return max(1.0, key.rate_per_s)

    def take(self, key: ApiKey, count: int, now: float) -> float:
        """Takes ``count`` tasks from the key's bucket; returns 0 when allowed, else the seconds
        until they would be."""
        if key.rate_per_s <= 0:
            return 0.0
        burst = self.burst(key)
        tokens, at = self._buckets.get(key.key_id, (burst, now))
        tokens = min(burst, tokens + (now - at) * key.rate_per_s)
        if tokens >= count:
            self._buckets[key.key_id] = (tokens - count, now)
            return 0.0
        self._buckets[key.key_id] = (tokens, now)
        return (count - tokens) / key.rate_per_s


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
