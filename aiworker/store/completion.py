"""The completion scheduler: a thread that closes series and studies once they go quiet.

It asks the state DB, about four times per stable period, to complete every series with
no new instance for ``completion.series_stable_seconds``. Because the question is asked of
the DB (last-received times), it survives restarts: after a restart, series whose last
instance is older than the stable time complete on the first tick.
"""

from __future__ import annotations

import logging
import time

from aiworker.polling import PollingStage
from aiworker.store.db import StateDB

log = logging.getLogger("aiworker.store")


class CompletionScheduler(PollingStage):
    """Runs :meth:`StateDB.complete_idle` periodically until stopped."""

    name = "completion"
    join_timeout_s = 5.0

    def __init__(self, db: StateDB, stable_seconds: float):
        super().__init__(min(1.0, stable_seconds / 4))
        self.db = db
        self.stable_seconds = stable_seconds

    def tick(self) -> list[str]:
        """Complete what is due now; returns the series UIDs completed."""
        completed = self.db.complete_idle(time.time(), self.stable_seconds)
        for series_uid in completed:
            log.info("series complete (idle %.0fs): %s", self.stable_seconds, series_uid,
                     extra={"series_uid": series_uid})
        return completed
