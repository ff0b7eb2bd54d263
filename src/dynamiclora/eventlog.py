"""Bounded, append-only event logs (migrations, forgetting, consensus, cache consolidation).

A log keeps its newest ``cap`` records in memory and counts every record ever appended, so that record ``i`` of
the log has the stable sequence number ``total - len(log) + i``: persistence appends only what is new and drops
what fell off the front, whatever the log's age.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

LOG_CAP = 10_000  # records kept per log; older ones are dropped (from memory and, at the next save, from disk)


class EventLog(list):
    """A list of JSON-ready records that keeps its newest ``cap`` and numbers every record it was ever given."""

    def __init__(self, records: Iterable[dict[str, Any]] = (), cap: int = LOG_CAP, total: int | None = None) -> None:
        super().__init__(records)
        self.cap = cap
        self.total = len(self) if total is None else total
        self._trim()

    def append(self, record: dict[str, Any]) -> None:
        super().append(record)
        self.total += 1
        self._trim()

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.append(r)

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest record still held."""
        return self.total - len(self)

    def since(self, seq: int) -> list[tuple[int, dict[str, Any]]]:
        """(sequence number, record) of every held record numbered ``seq`` or later."""
        start = max(seq, self.first_seq)
        return [(s, self[s - self.first_seq]) for s in range(start, self.total)]

    def _trim(self) -> None:
        if len(self) > self.cap:
            del self[: len(self) - self.cap]
