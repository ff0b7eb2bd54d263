"""API keys: one per agent, and an admin key. Keys are stored only as SHA-256 digests (SQLite in the state dir).

An agent key may generate with and learn into that agent's own tiers only; the admin key registers agents and
runs ticks. The admin key comes from ``DYNAMICLORA_ADMIN_KEY`` or is created once in ``<state>/admin.key``
(mode 0600).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

DB_NAME = "keys.sqlite"
ADMIN_FILE = "admin.key"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    admin: bool
    agent: str | None = None

    def may_act_as(self, agent_id: str) -> bool:
        return self.admin or self.agent == agent_id


class KeyStore:
    def __init__(self, state_dir: Path, admin_key: str | None = None) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_NAME
        self._lock = threading.Lock()  # one connection, shared by the request threads
        self._con = sqlite3.connect(self.path, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")
        with self._lock, self._con:
            self._con.execute("CREATE TABLE IF NOT EXISTS keys (digest TEXT PRIMARY KEY, agent TEXT NOT NULL UNIQUE)")
        self.admin_key = admin_key or os.environ.get("DYNAMICLORA_ADMIN_KEY") or self._admin_file(state_dir)
        self._admin_digest = digest(self.admin_key)

    @staticmethod
    def _admin_file(state_dir: Path) -> str:
        path = state_dir / ADMIN_FILE
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("dla-" + secrets.token_urlsafe(24))
                f.flush()
                os.fsync(f.fileno())
        return path.read_text().strip()

    def issue(self, agent_id: str) -> str:
        """A new key for ``agent_id`` (replacing its old one), durable before it is returned."""
        key = "dlk-" + secrets.token_urlsafe(24)
        with self._lock, self._con:  # one transaction, committed before the key is returned
            self._con.execute("DELETE FROM keys WHERE agent = ?", (agent_id,))
            self._con.execute("INSERT INTO keys (digest, agent) VALUES (?, ?)", (digest(key), agent_id))
        return key

    def revoke(self, agent_id: str) -> bool:
        """Delete the agent's key (durable before it returns); whether it had one."""
        with self._lock, self._con:
            return self._con.execute("DELETE FROM keys WHERE agent = ?", (agent_id,)).rowcount > 0

    def has_key(self, agent_id: str) -> bool:
        with self._lock:
            return self._con.execute("SELECT 1 FROM keys WHERE agent = ?", (agent_id,)).fetchone() is not None

    def resolve(self, key: str) -> Principal | None:
        d = digest(key)
        if secrets.compare_digest(d, self._admin_digest):
            return Principal(admin=True)
        with self._lock:
            row = self._con.execute("SELECT agent FROM keys WHERE digest = ?", (d,)).fetchone()
        return Principal(admin=False, agent=row[0]) if row else None
