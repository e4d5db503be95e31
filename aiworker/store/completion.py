"""The completion scheduler: a thread that closes series and studies once they go quiet.

It asks the state DB, about four times per stable period, to complete every series with
no new instance for ``completion.series_stable_seconds``. Because the question is asked of
the DB (last-received times), it survives restarts: after a restart, series whose last
instance is older than the stable time complete on the first tick.
"""

from __future__ import annotations

import logging
import threading
import time

from aiworker.store.db import StateDB

log = logging.getLogger("aiworker.store")


class CompletionScheduler:
    """Runs :meth:`StateDB.complete_idle` periodically until stopped."""

    def __init__(self, db: StateDB, stable_seconds: float):
        self.db = db
        self.stable_seconds = stable_seconds
        self.interval = min(1.0, stable_seconds / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def tick(self) -> list[str]:
        """Complete what is due now; returns the series UIDs completed."""
        completed = self.db.complete_idle(time.time(), self.stable_seconds)
        for series_uid in completed:
            log.info("series complete (idle %.0fs): %s", self.stable_seconds, series_uid,
                     extra={"series_uid": series_uid})
        return completed

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the scheduler alive; the next tick retries
                log.exception("completion tick failed")
            self._stop.wait(self.interval)
