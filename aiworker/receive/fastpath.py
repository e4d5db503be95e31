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

A C-STORE request is served on the DUL thread that assembled it rather than handed to
the association thread and back (:class:`_ServingQueue`): two thread hand-offs fewer.

DIMSE command sets are encoded and decoded without pydicom (:mod:`aiworker.receive.dimse_codec`,
which :func:`install` puts in place too).

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
import threading
import time
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from aiworker.receive import dimse_codec

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _WakingQueue(queue.Queue):
    """A queue that calls ``wake()`` after every put."""

    def __init__(self, wake: Any):
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _ServingQueue(queue.Queue):
    """An acceptor's DIMSE message queue that serves C-STORE requests on arrival.

    pynetdicom's DUL thread puts each whole DIMSE message on this queue for the association
    thread to serve. A C-STORE request put by the DUL thread is served right there instead
    (its response is queued for that same thread to send next), which saves two hand-offs
    between threads, ~0.15 ms an image; every other message is queued as before.
    """

    def __init__(self, assoc: Association):
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if (isinstance(primitive, C_STORE) and primitive.Status is None
                and threading.current_thread() is self._assoc.dul):
            self._assoc._serve_request(primitive, context_id)
            return
        super().put(item, block, timeout)


class WakingDUL(DULServiceProvider):
    """pynetdicom's DUL provider whose idle wait ends as soon as there is work."""

    def __init__(self, assoc: Association):
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _WakingQueue(self._poke)
        self.to_user_queue = _WakingQueue(self._wake_association)
        self._tuned = False

    def _wake_association(self) -> None:
        """Wake the association thread: a primitive (a release request, say) awaits it."""
        messages = self.assoc.dimse.msg_queue
        with messages.not_empty:
            messages.not_empty.notify_all()

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
        if self.assoc.is_acceptor:
            self.assoc.dimse.msg_queue = _ServingQueue(self.assoc)
        try:
            super().run_reactor()
        finally:
            self._wake_r.close()
            self._wake_w.close()


ASSOCIATION_IDLE_WAIT = 0.02  # s; what is not announced (a dead DUL thread) is seen this late


def _wait_for_dimse(assoc: Association) -> None:
    """Sleep until a DIMSE message or another primitive awaits the association, or
    :data:`ASSOCIATION_IDLE_WAIT` passes (pynetdicom polls every 1 ms, which costs the
    receiving thread a few per cent in contention for the interpreter)."""
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        if not messages._qsize() and not assoc.dul.to_user_queue.qsize():
            messages.not_empty.wait(ASSOCIATION_IDLE_WAIT)


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
            _wait_for_dimse(thread)
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
    """Make every pynetdicom association created from now on use the waking reactors (and
    the direct command set codec)."""
    global _installed
    if _installed:
        return
    _association.DULServiceProvider = WakingDUL  # type: ignore[misc]
    _association.time = _ReactorTime()  # type: ignore[assignment]
    _dul.time = _ReactorTime()  # type: ignore[assignment]
    AssociationSocket.recv = _recv  # type: ignore[method-assign]
    dimse_codec.install()
    _reuse_large_buffers()
    _installed = True
