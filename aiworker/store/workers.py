"""The workers that run stage jobs on a shared state, mixed into
:class:`~aiworker.store.db.StateDB`: each ``aiworker worker`` (and a ``serve`` on
PostgreSQL) announces itself with its queues and its models' devices, refreshes ``seen_at``
while it runs, and leaves at a clean stop. ``status`` and ``/readyz`` list them; one not
seen for a while was killed (its jobs are retried elsewhere by procrastinate)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

SILENT_AFTER_S = 20.0  # a running worker refreshes its row every few seconds


class WorkerTable:
    """The worker methods of the state DB (which gives the transaction and the query)."""

    _transaction: Callable[[], AbstractContextManager[Any]]
    _query: Callable[..., list[Any]]

    def announce_worker(self, worker: str, queues: list[str], devices: dict[str, str],
                        started_at: float) -> None:
        """Record (or refresh) a running worker: its queues and each model's device."""
        now = time.time()
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO workers (worker, queues, devices, started_at, seen_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (worker) DO UPDATE SET"
                " queues = excluded.queues, devices = excluded.devices,"
                " seen_at = excluded.seen_at",
                (worker, ",".join(queues), json.dumps(devices), started_at, now))

    def worker_gone(self, worker: str) -> None:
        """A worker stopped cleanly."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM workers WHERE worker = ?", (worker,))

    def workers(self) -> list[dict[str, Any]]:
        """Every announced worker, with ``seen_s`` (seconds since its last refresh)."""
        now = time.time()
        rows = self._query("SELECT * FROM workers ORDER BY worker")
        return [dict(row, queues=row["queues"].split(","),
                     devices=json.loads(row["devices"] or "{}"),
                     seen_s=round(now - row["seen_at"], 1)) for row in rows]
