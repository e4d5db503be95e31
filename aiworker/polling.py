"""The one skeleton of a stage thread: the completion scheduler, selection, inference,
the outbox and retention each poll the state DB for work, in a thread of their own.

A :class:`PollingStage` calls :meth:`~PollingStage.tick` every ``interval`` seconds until
:meth:`~PollingStage.stop`. A tick that raises is logged and the next one tries again, so one
bad row never stops a stage for good. A stage whose tick returns something true (it found
work) polls again at once when ``again_at_once`` is set.
"""

from __future__ import annotations

import logging
import threading
from typing import Any


class PollingStage:
    """A daemon thread named ``name`` that ticks until stopped."""

    name = "stage"
    again_at_once = False  # tick again without waiting when the last tick found work
    join_timeout_s = 10.0  # how long stop() waits for the running tick

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the running work to end at its next check, without waiting (a stage whose
        work runs as queue jobs, outside its own thread)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop ticking; wait for the running tick (up to :meth:`join_timeout`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.join_timeout())

    def join_timeout(self) -> float:
        return self.join_timeout_s

    def tick(self) -> Any:
        """One look for work, and the work found."""
        raise NotImplementedError

    def finished(self) -> None:
        """Called on the stage's own thread after its last tick."""

    def _run(self) -> None:
        log = logging.getLogger(type(self).__module__)
        try:
            while not self._stop.is_set():
                try:
                    found = self.tick()
                except Exception:  # keep the stage alive; the next tick retries
                    log.exception("%s tick failed", self.name)
                    found = False
                if not (found and self.again_at_once):
                    self._stop.wait(self.interval)
        finally:
            self.finished()
