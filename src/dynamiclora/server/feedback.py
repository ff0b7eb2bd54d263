"""What the server answered, so that a client can later confirm or correct it (``POST /v1/feedback``).

Each completion's id, agent, the token ids the model read and the text it gave are kept in
``<state>/completions.sqlite`` (the latest ``KEEP`` of them), written before the answer is sent, so feedback
works across restarts. Feedback learns the exchange into that agent's context tier: the reply as given when
it is accepted, the corrected text when it is corrected.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DB_NAME = "completions.sqlite"
KEEP = 10_000  # completions kept for feedback; older ones are forgotten


@dataclass(frozen=True)
class Exchange:
    id: str
    agent: str
    prompt_ids: list[int]
    text: str
    reply_ids: list[int] | None = None  # the tokens the text was decoded from (None: cut at a stop string)

    @property
    def reply(self) -> str | list[int]:
        """What to learn when the reply is accepted: its own tokens where the text is exactly their decoding
        (text re-encoded is not always the same tokens: a piece of a character decodes to U+FFFD)."""
        return self.reply_ids if self.reply_ids else self.text


class CompletionLog:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared by the request threads
        self._con = sqlite3.connect(state_dir / DB_NAME, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        with self._lock, self._con:
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS completions (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, "
                "agent TEXT NOT NULL, prompt_ids TEXT NOT NULL, text TEXT NOT NULL, created REAL NOT NULL, "
                "reply_ids TEXT)"
            )
            columns = {row[1] for row in self._con.execute("PRAGMA table_info(completions)")}
            if "reply_ids" not in columns:  # a log written before replies kept their tokens
                self._con.execute("ALTER TABLE completions ADD COLUMN reply_ids TEXT")

    def record(self, exchange: Exchange) -> None:
        with self._lock, self._con:
            self._con.execute(
                "INSERT INTO completions (id, agent, prompt_ids, text, created, reply_ids) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    exchange.id,
                    exchange.agent,
                    json.dumps(exchange.prompt_ids),
                    exchange.text,
                    time.time(),
                    None if exchange.reply_ids is None else json.dumps(exchange.reply_ids),
                ),
            )
            self._con.execute("DELETE FROM completions WHERE seq <= (SELECT MAX(seq) FROM completions) - ?", (KEEP,))

    def find(self, completion_id: str) -> Exchange | None:
        with self._lock:
            row = self._con.execute(
                "SELECT id, agent, prompt_ids, text, reply_ids FROM completions WHERE id = ?", (completion_id,)
            ).fetchone()
        if row is None:
            return None
        return Exchange(row[0], row[1], json.loads(row[2]), row[3], None if row[4] is None else json.loads(row[4]))

    def forget_agent(self, agent_id: str) -> int:
        with self._lock, self._con:
            return self._con.execute("DELETE FROM completions WHERE agent = ?", (agent_id,)).rowcount
