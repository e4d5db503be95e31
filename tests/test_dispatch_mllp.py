"""The MLLP client against a real TCP listener on a loopback port: the framing it sends,
and the outcome of every kind of answer (AA, CA, AE, CE, AR, CR, none, garbage, a closed
connection) and of a refused connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from helpers.tools import free_port

from aiworker.dispatch.mllp import DEAD, DELIVERED, RETRY, frame, send_mllp

MESSAGE = ("MSH|^~\\&|AIWORKER|RAD|RIS|HOSP|20240102080000||ORU^R01^ORU_R01|CTRL1|P|2.5.1"
           "||||||UNICODE UTF-8\rPID|1||PH1||O'BRIEN^SIOBHÁN\r")


def ack(code: str, reason: str = "") -> bytes:
    """An MLLP-framed ACK with MSA-1 ``code`` and MSA-3 ``reason``."""
    text = ("MSH|^~\\&|RIS|HOSP|AIWORKER|RAD|20240102080001||ACK^R01^ACK|A1|P|2.5.1\r"
            f"MSA|{code}|CTRL1|{reason}\r")
    return frame(text)


@dataclass
class Listener:
    """A one-connection-at-a-time TCP server on 127.0.0.1 that keeps the bytes it
    received and answers each connection with ``answer(received)`` (None: no answer)."""

    answer: Callable[[bytes], bytes | None]
    piece: int = 0  # > 0: send the reply in pieces of this many bytes
    port: int = 0
    received: list[bytes] = field(default_factory=list)
    sock: socket.socket | None = None

    def start(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                conn.settimeout(5)
                while not data.endswith(b"\x1c\x0d"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data)
                reply = self.answer(data)
                if reply is None:
                    time.sleep(1.0)  # say nothing until the client gives up
                else:
                    self._send(conn, reply)

    def _send(self, conn: socket.socket, reply: bytes) -> None:
        step = self.piece or len(reply) or 1
        for start in range(0, len(reply), step):
            conn.sendall(reply[start:start + step])
            if self.piece:
                time.sleep(0.01)

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def listen() -> Iterator[Callable[[Callable[[bytes], bytes | None]], Listener]]:
    started: list[Listener] = []

    def start(answer: Callable[[bytes], bytes | None], piece: int = 0) -> Listener:
        listener = Listener(answer, piece)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def test_aa_is_delivered_and_the_message_is_framed_in_utf8(listen):
    listener = listen(lambda _: ack("AA"))
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=5)
    assert delivery.outcome == DELIVERED and delivery.delivered
    assert delivery.ack_code == "AA" and delivery.reason == ""
    [sent] = listener.received
    assert sent.startswith(b"\x0b") and sent.endswith(b"\x1c\x0d")
    assert sent[1:-2].decode("utf-8") == MESSAGE
    assert "SIOBHÁN".encode() in sent


def test_ca_is_delivered(listen):
    listener = listen(lambda _: ack("CA"))
    assert send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=5).outcome == DELIVERED


@pytest.mark.parametrize("code", ["AE", "CE"])
def test_an_error_is_retried_with_the_reason(listen, code):
    listener = listen(lambda _: ack(code, "database busy"))
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=5)
    assert (delivery.outcome, delivery.ack_code, delivery.reason) == (
        RETRY, code, f"{code} from the receiver: database busy")


@pytest.mark.parametrize("code", ["AR", "CR"])
def test_a_rejection_is_dead_with_the_reason(listen, code):
    listener = listen(lambda _: ack(code, "unknown patient"))
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=5)
    assert (delivery.outcome, delivery.ack_code, delivery.reason) == (
        DEAD, code, f"{code} from the receiver: unknown patient")


def test_a_rejection_without_msa3_takes_the_reason_from_err(listen):
    text = ("MSH|^~\\&|RIS|HOSP|AIWORKER|RAD|20240102080001||ACK^R01^ACK|A1|P|2.5.1\r"
            "MSA|AR|CTRL1\rERR||PID^1^3|101^Required field missing^HL70357|E\r")
    listener = listen(lambda _: frame(text))
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=5)
    assert (delivery.outcome, delivery.reason) == (
        DEAD, "AR from the receiver: Required field missing")


def test_a_long_message_and_an_ack_in_pieces_are_read_whole(listen):
    listener = listen(lambda _: ack("AR", "duplicate order"), piece=7)
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE * 200, timeout_s=5)
    assert (delivery.outcome, delivery.reason) == (DEAD, "AR from the receiver: duplicate order")
    assert listener.received[0][1:-2].decode() == MESSAGE * 200


def test_no_answer_is_retried_after_the_timeout(listen):
    listener = listen(lambda _: None)
    started = time.monotonic()
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=0.3)
    took = time.monotonic() - started
    assert delivery.outcome == RETRY and delivery.ack_code is None
    assert "no acknowledgment within 0.3 s" in delivery.reason
    assert 0.25 <= took < 0.9
    assert listener.received  # the message did arrive


def test_a_closed_connection_is_retried(listen):
    listener = listen(lambda _: b"")
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=5)
    assert delivery.outcome == RETRY
    assert delivery.reason == "connection closed before the acknowledgment"


def test_a_reply_that_is_no_ack_is_retried(listen):
    listener = listen(lambda _: frame("hello"))
    delivery = send_mllp("127.0.0.1", listener.port, MESSAGE, timeout_s=5)
    assert delivery.outcome == RETRY and delivery.reason.startswith("unreadable acknowledgment")


def test_a_refused_connection_is_retried():
    port = free_port()
    delivery = send_mllp("127.0.0.1", port, MESSAGE, timeout_s=2)
    assert delivery.outcome == RETRY and delivery.ack_code is None
    assert delivery.reason.startswith(f"cannot reach 127.0.0.1:{port}")
    assert "refused" in delivery.reason.lower()
