"""Requestor associations whose DIMSE responses always reach the call that waits for them.

pynetdicom's association thread runs a reactor while an association is up: it polls the
DIMSE message queue for requests from the peer and serves them. ``send_c_store`` (and every
other ``send_*``) pauses the reactor before it sends its request, but it learns that the
reactor is paused from a flag the reactor sets *before* its last look at the queue. A peer
on the same host answers in well under a millisecond, so now and then the response lands in
that gap: the reactor takes it off the queue and drops it (a response is no request it can
serve), and the sender waits ``dimse_timeout`` seconds for nothing and aborts the
association. A PACS then gets the object again on the retry; a test sees a timeout.

:func:`associate` installs a message queue that keeps responses for the caller: the
association thread's non-blocking look never takes a response, only requests (and the
"connection gone" marker) as before.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association


class ResponsesForTheCaller(queue.Queue):
    """A DIMSE message queue whose responses go only to a blocking ``get`` (the ``send_*``
    call that waits for one), never to the association thread's reactor."""

    def __init__(self, assoc: Association):
        super().__init__()
        self._assoc = assoc

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block and threading.current_thread() is self._assoc:
            with self.mutex:
                if self.queue and _is_response(self.queue[0]):
                    raise queue.Empty
        return super().get(block, timeout)


def _is_response(item: tuple[int | None, Any]) -> bool:
    """Whether a queued (context id, primitive) holds a DIMSE response (it has a status)."""
    _context_id, primitive = item
    return primitive is not None and getattr(primitive, "Status", None) is not None


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate(host, port, **kwargs)``, with a message queue that keeps responses
    for the caller once the association is established (see the module docstring)."""
    assoc = ae.associate(host, port, **kwargs)
    if assoc.is_established:
        keeper = ResponsesForTheCaller(assoc)
        pending = assoc.dimse.msg_queue
        while not pending.empty():  # nothing is expected here yet; keep it if there is
            keeper.put(pending.get_nowait())
        assoc.dimse.msg_queue = keeper
    return assoc
