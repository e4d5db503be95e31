"""A RIS stand-in: an MLLP listener that records each message and answers it."""

from __future__ import annotations

import time

from aiworker.dispatch.mllp import MllpReceiver

# --- a RIS stand-in ------------------------------------------------------------------------


class MllpListener:
    """A RIS for tests (:class:`~aiworker.dispatch.mllp.MllpReceiver` on a free loopback
    port): keeps each message's text in ``messages`` and answers it with MSA-1 the next of
    ``codes`` (the last one repeats) and MSA-3 ``reason``, after waiting the next of
    ``delays_s`` seconds (none when they run out)."""

    def __init__(self, codes: tuple[str, ...] = ("AA",), reason: str = "",
                 delays_s: tuple[float, ...] = ()):
        self.codes, self.reason, self.delays_s = list(codes), reason, list(delays_s)
        self.messages: list[str] = []
        self.receiver = MllpReceiver(self._answer)
        self.port = self.receiver.port

    def _answer(self, message: str) -> tuple[str, str]:
        n = len(self.messages)
        self.messages.append(message)
        time.sleep(self.delays_s[n] if n < len(self.delays_s) else 0)
        return self.codes[min(n, len(self.codes) - 1)], self.reason

    def stop(self) -> None:
        self.receiver.close()
