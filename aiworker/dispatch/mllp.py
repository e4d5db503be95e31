"""MLLP: send one HL7 message over TCP and read its acknowledgment; and a small receiver.

A message travels framed as ``0x0B <message> 0x1C 0x0D`` (the Minimal Lower Layer
Protocol), encoded in UTF-8 (the message's MSH-18 says ``UNICODE UTF-8``); the reply is
framed the same way. What the outbox does next follows from the reply:

* ``delivered``: MSA-1 is AA or CA (accepted);
* ``retry``: MSA-1 is AE or CE (an error the receiver may not repeat), or no ACK came
  (connection refused or reset, no answer within the timeout, an unreadable reply);
* ``dead``: MSA-1 is AR or CR (rejected: sending the same message again cannot succeed).

The client is one blocking call on one connection, without threads of its own; retries
and their backoff are the outbox's business. :class:`MllpReceiver` is the other end, small
and threaded: the stand-in RIS of ``aiworker demo``, the benchmarks and the tests.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiworker.results.hl7 import parse_ack

START, END = b"\x0b", b"\x1c\x0d"
DELIVERED, RETRY, DEAD = "delivered", "retry", "dead"
RECEIVE_TIMEOUT_S = 30.0  # MllpReceiver drops a connection quiet for this long
OUTCOMES = {"AA": DELIVERED, "CA": DELIVERED, "AE": RETRY, "CE": RETRY,
            "AR": DEAD, "CR": DEAD}


@dataclass(frozen=True)
class Delivery:
    """What became of one message: ``outcome`` (delivered, retry or dead), the ACK code
    (MSA-1) when one came, and why it was not delivered."""

    outcome: str
    ack_code: str | None = None
    reason: str = ""

    @property
    def delivered(self) -> bool:
        return self.outcome == DELIVERED


def frame(message: str) -> bytes:
    """``message`` in UTF-8 inside the MLLP start and end blocks."""
    return START + message.encode("utf-8") + END


def send_mllp(host: str, port: int, message: str, timeout_s: float) -> Delivery:
    """Send ``message`` to ``host:port`` and wait at most ``timeout_s`` seconds in all
    for its ACK."""
    deadline = time.monotonic() + timeout_s
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as error:
        return Delivery(RETRY, reason=f"cannot reach {host}:{port}: {_why(error)}")
    try:
        with sock:
            sock.sendall(frame(message))
            reply = _read_frame(sock, deadline)
    except TimeoutError:
        return Delivery(RETRY, reason=f"no acknowledgment within {timeout_s:g} s")
    except OSError as error:
        return Delivery(RETRY, reason=f"connection to {host}:{port} failed: {_why(error)}")
    if reply is None:
        return Delivery(RETRY, reason="connection closed before the acknowledgment")
    try:
        code, text = parse_ack(reply)
    except ValueError as error:
        return Delivery(RETRY, reason=f"unreadable acknowledgment: {error}")
    outcome = OUTCOMES[code]
    if outcome == DELIVERED:
        return Delivery(outcome, code)
    return Delivery(outcome, code, f"{code} from the receiver" + (f": {text}" if text else ""))


def _why(error: OSError) -> str:
    """A short reason for a socket error."""
    return error.strerror or str(error) or error.__class__.__name__


def _read_frame(sock: socket.socket, deadline: float) -> str | None:
    """The text of the first MLLP frame the peer sends, or None if it closes first;
    raise TimeoutError at ``deadline``."""
    data = b""
    while END not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    body = data[:data.index(END)]
    return body[body.find(START) + 1:].decode("utf-8", errors="replace")


def ack_for(message: str, code: str = "AA", text: str = "") -> str:
    """The ACK a receiver sends for ``message``: MSA-1 ``code``, MSA-2 the message's control
    id (MSH-10), MSA-3 ``text``; sender and receiver of the MSH swapped."""
    fields = message.split("\r", 1)[0].split("|") + [""] * 10
    stamp = time.strftime("%Y%m%d%H%M%S")
    return (f"MSH|^~\\&|{fields[4]}|{fields[5]}|{fields[2]}|{fields[3]}|{stamp}||ACK^R01^ACK|"
            f"ACK{fields[9]}|P|2.5.1\rMSA|{code}|{fields[9]}|{text}\r")


class MllpReceiver:
    """A small HL7 receiver over MLLP on a free loopback port (``port``): the stand-in RIS of
    the demo, the benchmarks and the tests. Each connection is read on its own thread; each
    framed message goes to ``answer(message) -> (ACK code, text)`` and is acknowledged with
    :func:`ack_for`. :meth:`close` stops accepting."""

    def __init__(self, answer: Callable[[str], tuple[str, str]] = lambda _: ("AA", ""),
                 host: str = "127.0.0.1"):
        self.answer = answer
        self.sock = socket.create_server((host, 0))
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="mllp-receiver").start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Answer every message of one connection until the sender closes it."""
        with conn:
            conn.settimeout(RECEIVE_TIMEOUT_S)
            buffer = b""
            try:
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while END in buffer:
                        body, buffer = buffer.split(END, 1)
                        message = body[body.find(START) + 1:].decode("utf-8", errors="replace")
                        conn.sendall(frame(ack_for(message, *self.answer(message))))
            except OSError:  # the sender went away or went quiet
                return
