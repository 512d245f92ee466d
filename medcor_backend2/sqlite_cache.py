"""A cache in one SQLite file, shared by every process of the machine, with atomic increment.

The embedded default for rate limits and idempotency keys when no REDIS_URL is set: Django's
file and database caches increment with a read then a write, so two processes can lose a count.
Here `incr` and `add` are single SQL statements, which SQLite runs atomically.
"""

import pickle
import sqlite3
import threading
import time
from pathlib import Path

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    value BLOB,
    counter INTEGER,
    expires REAL
)
"""


class SQLiteCache(BaseCache):
    """Django cache backend storing entries in the SQLite file named by LOCATION."""

    def __init__(self, location, params):
        super().__init__(params)
        self._path = Path(location)
        self._local = threading.local()

    @property
    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            self._local.db = db
        return db

    def _expiry(self, timeout):
        timeout = self.get_backend_timeout(timeout)
        return None if timeout is None else time.time() + timeout

    @staticmethod
    def _encode(value):
        # Integers live in their own column so that incr can add to them in SQL.
        if isinstance(value, int) and not isinstance(value, bool):
            return None, value
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL), None

    def _purge_expired(self, key):
        self._db.execute("DELETE FROM cache WHERE key = ? AND expires <= ?", (key, time.time()))

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        self._purge_expired(key)
        blob, counter = self._encode(value)
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO cache (key, value, counter, expires) VALUES (?, ?, ?, ?)",
            (key, blob, counter, self._expiry(timeout)),
        )
        return cursor.rowcount == 1

    def get(self, key, default=None, version=None):
        key = self.make_and_validate_key(key, version=version)
        row = self._db.execute(
            "SELECT value, counter FROM cache WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (key, time.time()),
        ).fetchone()
        if row is None:
            return default
        return row[1] if row[0] is None else pickle.loads(row[0])

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        blob, counter = self._encode(value)
        self._db.execute(
            "INSERT OR REPLACE INTO cache (key, value, counter, expires) VALUES (?, ?, ?, ?)",
            (key, blob, counter, self._expiry(timeout)),
        )

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        cursor = self._db.execute(
            "UPDATE cache SET expires = ? WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (self._expiry(timeout), key, time.time()),
        )
        return cursor.rowcount == 1

    def incr(self, key, delta=1, version=None):
        key = self.make_and_validate_key(key, version=version)
        row = self._db.execute(
            "UPDATE cache SET counter = counter + ? WHERE key = ? AND counter IS NOT NULL "
            "AND (expires IS NULL OR expires > ?) RETURNING counter",
            (delta, key, time.time()),
        ).fetchone()
        if row is None:
            raise ValueError(f"Key '{key}' not found")
        return row[0]

    def delete(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self._db.execute("DELETE FROM cache WHERE key = ?", (key,)).rowcount == 1

    def has_key(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return (
            self._db.execute(
                "SELECT 1 FROM cache WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (key, time.time()),
            ).fetchone()
            is not None
        )

    def clear(self):
        self._db.execute("DELETE FROM cache")

    def close(self, **kwargs):
        # Kept open across requests: a connection per thread is cheap and reused.
        pass
