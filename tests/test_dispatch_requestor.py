"""Requestor associations keep DIMSE responses for the call waiting for them
(aiworker/dispatch/requestor.py): the association thread's reactor may take only requests."""

from __future__ import annotations

import queue
import threading

import pytest
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from aiworker.dispatch.requestor import ResponsesForTheCaller


def _response() -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = 0x0000
    return primitive


def _request() -> C_ECHO:
    primitive = C_ECHO()
    primitive.MessageID = 7
    return primitive


def _in_thread(call):
    """``call()`` run in a thread of its own; the thread (the stand-in association thread)
    and what the call returned or raised."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call(thread.queue)
        except queue.Empty as empty:
            outcome["value"] = empty

    thread = threading.Thread(target=run)
    thread.queue = ResponsesForTheCaller(thread)  # type: ignore[attr-defined]
    return thread, outcome


def test_the_reactor_never_takes_a_response_the_caller_waits_for():
    response = _response()
    thread, outcome = _in_thread(lambda q: (q.put((1, response)), q.get(block=False))[1])
    thread.start()
    thread.join(5)
    assert isinstance(outcome["value"], queue.Empty)
    assert thread.queue.get(block=True, timeout=1) == (1, response)  # the sender gets it


def test_the_reactor_still_takes_requests_and_the_connection_gone_marker():
    request = _request()
    thread, outcome = _in_thread(lambda q: (q.put((3, request)), q.get(block=False))[1])
    thread.start()
    thread.join(5)
    assert outcome["value"] == (3, request)
    thread, outcome = _in_thread(lambda q: (q.put((None, None)), q.get(block=False))[1])
    thread.start()
    thread.join(5)
    assert outcome["value"] == (None, None)


def test_other_threads_take_responses_without_blocking_too():
    keeper = ResponsesForTheCaller(threading.Thread(target=lambda: None))
    keeper.put((1, _response()))
    assert keeper.get(block=False)[1].Status == 0x0000
    with pytest.raises(queue.Empty):
        keeper.get(block=False)
