"""MLLP: send one HL7 message over TCP and read its acknowledgment; and a small receiver.

A message travels framed as ``0x0B <message> 0x1C 0x0D`` (the Minimal Lower Layer
Protocol), encoded in UTF-8 (the message's MSH-18 says ``UNICODE UTF-8``); the reply is
framed the same way. What the outbox does next follows from the reply:

* ``delivered``: MSA-1 is AA or CA (accepted);
* ``retry``: MSA-1 is AE or CE (an error the receiver may not repeat), or no ACK came
  (connection refused or reset, no answer within the timeout, an unreadable reply);
* ``dead``: MSA-1 is AR or CR (rejected: sending the same message again cannot succeed).

An ACK counts only for the message it names: when its MSA-2 is not the message's control
ID (MSH-10), whatever its MSA-1, the attempt failed (``retry``, "ACK for control ID X,
expected Y") - the receiver may have answered another sender's or an earlier message.

The client is one blocking call on one connection, without threads of its own; retries
and their backoff are the outbox's business. :class:`MllpReceiver` is the other end, small
and threaded: the stand-in RIS of ``aiworker demo``, the benchmarks and the tests.
"""

from __future__ import annotations

import contextlib
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


def send_mllp(host: str, port: int, message: str, timeout_s: float,
              connect_timeout_s: float | None = None) -> Delivery:
    """Send ``message`` to ``host:port`` (connecting within ``connect_timeout_s``, by
    default ``timeout_s``) and wait at most ``timeout_s`` seconds for its ACK."""
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout_s or timeout_s)
    except OSError as error:
        return Delivery(RETRY, reason=f"cannot reach {host}:{port}: {_why(error)}")
    deadline = time.monotonic() + timeout_s
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
    expected, acked = control_id(message, "MSH", 10), control_id(reply, "MSA", 2)
    if acked != expected:
        return Delivery(RETRY, code, f"ACK for control ID {acked or '(none)'}, "
                                     f"expected {expected}")
    outcome = OUTCOMES[code]
    if outcome == DELIVERED:
        return Delivery(outcome, code)
    return Delivery(outcome, code, f"{code} from the receiver" + (f": {text}" if text else ""))


def control_id(message: str, segment: str, field: int) -> str:
    """Field ``field`` of the first ``segment`` of an ER7 message (MSH-10 is the control
    ID, MSA-2 the control ID an ACK answers); empty when absent."""
    text = message.strip("\x0b\x1c\r\n").replace("\r\n", "\r").replace("\n", "\r")
    separator = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    for line in text.split("\r"):
        if line.startswith(segment + separator):
            fields = line.split(separator)
            index = field - 1 if segment == "MSH" else field  # MSH-1 is the separator itself
            return fields[index].strip() if index < len(fields) else ""
    return ""


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
    :func:`ack_for`. :meth:`close` stops accepting; a new receiver given the old one's
    ``port`` takes its place (a RIS restarted)."""

    def __init__(self, answer: Callable[[str], tuple[str, str]] = lambda _: ("AA", ""),
                 host: str = "127.0.0.1", acked_id: Callable[[str], str] | None = None,
                 port: int = 0):
        self.answer = answer
        self.acked_id = acked_id  # MSA-2 to answer with (tests: a wrong one); None = MSH-10
        self.sock = socket.create_server((host, port))  # port 0: a free one
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="mllp-receiver").start()

    def close(self) -> None:
        """Stop listening: the port refuses connections and is free again at once (a bare
        close would leave the socket listening while the accept thread waits in it)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
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
                        ack = ack_for(message, *self.answer(message))
                        if self.acked_id is not None:
                            ack = _with_msa2(ack, self.acked_id(message))
                        conn.sendall(frame(ack))
            except OSError:  # the sender went away or went quiet
                return


def _with_msa2(ack: str, acked: str) -> str:
    """``ack`` with its MSA-2 replaced by ``acked``."""
    lines = ack.split("\r")
    for n, line in enumerate(lines):
        if line.startswith("MSA|"):
            fields = line.split("|")
            fields[2] = acked
            lines[n] = "|".join(fields)
    return "\r".join(lines)
