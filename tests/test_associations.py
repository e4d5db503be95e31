"""Idle, half-open and hostile connections are dropped after the configured timeouts, so
they can never hold every association slot: with ``node.max_associations`` silent
connections open, a real sender still gets through within a timeout and a few seconds."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from helpers.dicom import raw_echo
from helpers.tools import dcmtk, needs_dcmtk, wait_until

TIMEOUT_S = 2.0
SLACK_S = 4.0  # a timer tick, the thread's exit and a loaded 2-core machine


def _fast_node(node_factory, **node):
    return node_factory(node={"acse_timeout_s": TIMEOUT_S, "network_timeout_s": TIMEOUT_S,
                              "dimse_timeout_s": TIMEOUT_S, **node})


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S + SLACK_S + 5)
    return sock


def _closed_by_peer_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the node closes ``sock`` (reading whatever it sends first)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the node kept the connection open for more than {seconds} s")
    return time.monotonic() - start


def associate_rq(called: str = "AIWORKER", calling: str = "SILENT") -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification in implicit VR."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + b"\x00" * 32 + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def test_timeouts_come_from_the_config(node_factory) -> None:
    node = _fast_node(node_factory, acse_timeout_s=3.5, dimse_timeout_s=4.5,
                      network_timeout_s=5.5)
    from aiworker.config_loader import load_config
    from aiworker.receive.scp import Receiver

    config = load_config(node.config_path)
    ae = Receiver.build_ae(type("R", (), {"config": config})())
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (3.5, 4.5, 5.5)


def test_silent_connection_is_dropped(node_factory) -> None:
    node = _fast_node(node_factory)
    sock = _connect(node.port)
    took = _closed_by_peer_within(sock, TIMEOUT_S + SLACK_S)
    assert took >= TIMEOUT_S - 0.5, f"dropped after {took:.1f} s, before the timeout"
    assert raw_echo(node.port) == 0x0000


def test_associate_rq_then_silence_is_dropped(node_factory) -> None:
    node = _fast_node(node_factory)
    sock = _connect(node.port)
    sock.sendall(associate_rq())
    pdu_type = sock.recv(1)
    assert pdu_type == b"\x02", "the node did not answer A-ASSOCIATE-AC"
    _closed_by_peer_within(sock, TIMEOUT_S + SLACK_S)
    assert raw_echo(node.port) == 0x0000


def test_half_sent_associate_rq_is_dropped(node_factory) -> None:
    node = _fast_node(node_factory)
    sock = _connect(node.port)
    sock.sendall(associate_rq()[:40])  # the PDU header promises more than ever comes
    _closed_by_peer_within(sock, TIMEOUT_S + SLACK_S)
    assert raw_echo(node.port) == 0x0000


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
                                     bytes(range(256)) * 4],
                         ids=["http", "tls-hello", "binary"])
def test_garbage_bytes_are_dropped(node_factory, garbage: bytes) -> None:
    node = _fast_node(node_factory)
    sock = _connect(node.port)
    sock.sendall(garbage)
    _closed_by_peer_within(sock, TIMEOUT_S + SLACK_S)
    assert raw_echo(node.port) == 0x0000
    assert node.running


@needs_dcmtk
def test_idle_connections_cannot_hold_every_slot(node_factory) -> None:
    slots = 3
    node = _fast_node(node_factory, max_associations=slots)
    idle = [_connect(node.port) for _ in range(slots)]
    half_open = _connect(node.port)
    half_open.sendall(associate_rq()[:20])
    opened = time.monotonic()

    def echo_succeeds() -> bool:
        proc = dcmtk("echoscu", "-to", "5", "-aec", node.ae_title, "127.0.0.1",
                     str(node.port), timeout=20)
        return proc.returncode == 0

    wait_until(echo_succeeds, TIMEOUT_S + SLACK_S, "echoscu to get through", interval=0.2)
    took = time.monotonic() - opened
    assert took <= TIMEOUT_S + SLACK_S, f"echoscu got through only after {took:.1f} s"
    for sock in idle + [half_open]:
        _closed_by_peer_within(sock, SLACK_S)
