"""Event-driven wake-ups for pynetdicom's polling reactors, and TCP options for loopback speed.

pynetdicom 3 runs two threads per association that poll: the DUL reactor sleeps 1 ms
(``_run_loop_delay``) whenever it finds nothing to do, and the acceptor's association
reactor sleeps 1 ms on every loop before looking for a DIMSE message. A C-STORE crosses both
several times, so a plain pynetdicom SCP spends most of its ~4 ms per image asleep.

:func:`install` keeps pynetdicom and its state machine as they are and changes only what
those sleeps wait on:

* the DUL thread waits in ``select()`` on its socket and on a wake-up socket pair that is
  poked whenever the association queues a PDU to send, so it wakes the moment data arrives
  or a response is ready (idle, it still wakes every 1 ms, as before);
* the association thread waits on its DIMSE message queue's condition, so it wakes the
  moment a whole message has arrived.

pynetdicom also reads each PDU from the socket in 4 KiB pieces (``AssociationSocket.recv``),
some 130 system calls and Python loops for one 512x512 image; :func:`install` has it read
into one buffer of the PDU's size instead.

Each DIMSE message's command set is encoded by pydicom's general writer twice (once to
learn the group length, once to send), a quarter of a millisecond each; command sets hold
a dozen plain elements, so :func:`encode_command_set` encodes them directly (falling back to
pydicom for anything else).

glibc hands each buffer over 128 KiB (every received data set) back to the kernel when it
is freed, so the next one is page-faulted in afresh (~80 faults a 512x512 image);
:func:`install` raises that threshold so such buffers are reused.

It also sets TCP_NODELAY on every association socket and re-arms Linux TCP_QUICKACK after
each PDU it sends (sending puts Linux back into delayed-ACK mode): senders that leave
Nagle's algorithm on (dcmtk's default) otherwise stall ~40 ms per C-STORE waiting for our
delayed ACK. (Re-arming it after every PDU read as well costs ~10 % of throughput and
changes nothing measurable.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import association as _association
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dsutils as _dsutils
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _WakingQueue(queue.Queue):
    """A queue that calls ``wake()`` after every put."""

    def __init__(self, wake: Any):
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class WakingDUL(DULServiceProvider):
    """pynetdicom's DUL provider whose idle wait ends as soon as there is work."""

    def __init__(self, assoc: Association):
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _WakingQueue(self._poke)
        self._tuned = False

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the association is closing

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` unless the socket has data or a PDU is waiting to go out."""
        raw = self.socket.socket if self.socket is not None else None
        if raw is None or raw.fileno() < 0:
            time.sleep(timeout)
            return
        if self.to_provider_queue.qsize() or (isinstance(raw, ssl.SSLSocket) and raw.pending()):
            return
        try:
            readable, _, _ = select.select([raw, self._wake_r], [], [], timeout)
        except (OSError, ValueError):
            return  # the socket closed under us; the reactor notices on its next loop
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def _read_pdu_data(self) -> None:
        if not self._tuned:
            self._tune_socket()
        super()._read_pdu_data()

    def _send(self, pdu: Any) -> None:
        super()._send(pdu)
        self._tune_socket()  # sending re-enables delayed ACKs; the next read must not wait

    def _tune_socket(self) -> None:
        raw = self.socket.socket if self.socket is not None else None
        if raw is None or raw.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            if not self._tuned:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._tuned = True
            if _QUICKACK is not None:
                raw.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass  # the peer already closed; nothing to tune

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_r.close()
            self._wake_w.close()


def _wait_for_dimse(assoc: Association, timeout: float) -> None:
    """Sleep up to ``timeout`` unless a whole DIMSE message is waiting for the association."""
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        if not messages._qsize():
            messages.not_empty.wait(timeout)


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: block until ``nr_bytes`` are read, or fewer if the peer
    closes; read straight into one buffer."""
    buffer = bytearray(nr_bytes)
    received = 0
    with memoryview(buffer) as view:
        while received < nr_bytes:
            count = self.socket.recv_into(view[received:])
            if not count:
                break
            received += count
    if received < nr_bytes:
        del buffer[received:]
    return buffer


_INTEGER_FORMATS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i"}
_TEXT_PADDING = {"UI": b"\x00", "AE": b" ", "LO": b" ", "SH": b" ", "CS": b" ", "ST": b" "}


def encode_command_set(ds: Dataset) -> bytes | None:
    """A DIMSE command set in implicit VR little endian (PS3.7 6.3.1), or None if ``ds`` has
    anything but group 0000 elements of the simple VRs command sets use."""
    parts = []
    for element in ds:
        tag, vr, value = element.tag, element.VR, element.value
        if tag >> 16 != 0:
            return None
        values = [] if value is None or value == "" else (
            list(value) if isinstance(value, MultiValue | list) else [value])
        if vr in _INTEGER_FORMATS:
            data = b"".join(struct.pack(_INTEGER_FORMATS[vr], v) for v in values)
        elif vr in _TEXT_PADDING:
            data = "\\".join(str(v) for v in values).encode("ascii")
            if len(data) % 2:
                data += _TEXT_PADDING[vr]
        elif vr == "AT":
            data = b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in values)
        else:
            return None
        parts.append(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(data)) + data)
    return b"".join(parts)


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    """pynetdicom's ``dsutils.encode``, with the direct path for command sets."""
    if is_implicit_vr and is_little_endian and not deflated:
        try:
            encoded = encode_command_set(ds)
        except (TypeError, ValueError, UnicodeEncodeError, struct.error):
            encoded = None
        if encoded is not None:
            return encoded
    return _dsutils.encode(ds, is_implicit_vr, is_little_endian, deflated)


class _ReactorTime:
    """Stands in for the ``time`` module inside pynetdicom's ``dul`` and ``association``.

    ``sleep`` called from a reactor thread becomes a wait that ends early when there is work;
    from any other thread, and for every other attribute, it is the real ``time``.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, WakingDUL):
            thread.wait(seconds)
        elif isinstance(thread, Association) and thread.is_acceptor and seconds <= 0.001:
            _wait_for_dimse(thread, seconds)
        else:
            time.sleep(seconds)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
LARGE_BUFFER_BYTES = 64 * 1024 * 1024


def _reuse_large_buffers() -> None:
    """Keep freed data-set-sized buffers in the heap (glibc only; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, 4 * LARGE_BUFFER_BYTES)
    except (OSError, AttributeError):
        pass


_installed = False


def install() -> None:
    """Make every pynetdicom association created from now on use the waking reactors."""
    global _installed
    if _installed:
        return
    _association.DULServiceProvider = WakingDUL  # type: ignore[misc]
    _association.time = _ReactorTime()  # type: ignore[assignment]
    _dul.time = _ReactorTime()  # type: ignore[assignment]
    AssociationSocket.recv = _recv  # type: ignore[method-assign]
    _dimse_messages.encode = _encode  # type: ignore[assignment]
    _reuse_large_buffers()
    _installed = True
