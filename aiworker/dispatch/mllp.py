"""MLLP client: send one HL7 message over TCP and read its acknowledgment.

A message travels framed as ``0x0B <message> 0x1C 0x0D`` (the Minimal Lower Layer
Protocol), encoded in UTF-8 (the message's MSH-18 says ``UNICODE UTF-8``); the reply is
framed the same way. What the outbox does next follows from the reply:

* ``delivered``: MSA-1 is AA or CA (accepted);
* ``retry``: MSA-1 is AE or CE (an error the receiver may not repeat), or no ACK came
  (connection refused or reset, no answer within the timeout, an unreadable reply);
* ``dead``: MSA-1 is AR or CR (rejected: sending the same message again cannot succeed).

The client is one blocking call on one connection, without threads of its own; retries
and their backoff are the outbox's business.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from aiworker.results.hl7 import parse_ack

START, END = b"\x0b", b"\x1c\x0d"
DELIVERED, RETRY, DEAD = "delivered", "retry", "dead"
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
