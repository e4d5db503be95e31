"""The C-ECHO / C-STORE SCP: thin pynetdicom event handlers that hand off to the store.

A C-STORE is answered success (0x0000) only after the instance is in the spool (written,
fsynced, renamed) and recorded in the state DB. Every other outcome has its own status and
an Error Comment the sender can show:

========  ===============================================================
0xA700    out of resources: free disk below ``storage.min_free_mb``, or the disk filled up
0xA900    the data set does not match the SOP class (PS3.4 B.2.3): its SOP Class UID
          differs from the command's or is missing, or an image storage instance has no
          Pixel Data
0xC210    cannot understand (PS3.4 B.2.3): the data set cannot be decoded, is truncated
          anywhere, or its Pixel Data is shorter than the image or badly encapsulated
0xC211    Study, Series or SOP Instance UID missing or malformed (never a path name)
0xC212    the data set's SOP Instance UID differs from the command's
0xC213    the spool write failed (I/O error), or the file read back differs
0xC214    the state DB could not record the instance
0xC215    an unexpected error in the node (logged with its traceback)
========  ===============================================================

0xA700 and 0xA900 are the PS3.4 codes for their cases; 0xC210 to 0xC215 are codes of the
"cannot understand" range, 0xC2xx being this node's. No warning status (0xB000, 0xB006,
0xB007) is ever sent: nothing is coerced or discarded, the data set is stored as sent.

A failed instance never replaces what the spool holds: a damaged resend of an instance
already stored leaves the good copy (the event says ``kept_stored_copy``). A complete
resend (same SOP Instance UID, whole and decodable) replaces the stored copy, as PS3.4
leaves to the SCP, and is recorded as the instance's newest version.

Every storage SOP class is accepted, private ones too, each in the first transfer syntax
the sender proposes for it (pynetdicom's unrestricted storage service); the data set is
stored byte for byte as received, and nothing is transcoded on receive. A transfer syntax
pydicom does not know cannot be checked and is refused (0xC210).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from aiworker.config import Config
from aiworker.receive import fastpath
from aiworker.receive.access import AllowList
from aiworker.receive.dataset import IncompleteDataSet, part10_header, read_header
from aiworker.receive.pixels import DamagedPixelData, has_pixel_data, is_image_storage
from aiworker.receive.tls import server_context
from aiworker.store.db import StateDB
from aiworker.store.records import InstanceRecord, MissingUID, instance_uids
from aiworker.store.spool import InvalidUID, Spool, printable

log = logging.getLogger("aiworker.receive")

OUT_OF_RESOURCES = 0xA700
NOT_SOP_CLASS = 0xA900
CANNOT_DECODE = 0xC210
BAD_UIDS = 0xC211
UID_MISMATCH = 0xC212
WRITE_FAILED = 0xC213
DB_FAILED = 0xC214
INTERNAL_ERROR = 0xC215


class StoreRefused(Exception):
    """An instance that will not be stored: carries the DIMSE status and the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _why_undecodable(exc: Exception) -> str:
    if isinstance(exc, IncompleteDataSet | DamagedPixelData):
        return str(exc)
    return f"cannot decode data set: {type(exc).__name__}"


def _check_sop_class(ds: Dataset, command_class: str) -> None:
    """The data set is of the SOP class the command names, and an image has Pixel Data;
    else :class:`StoreRefused` with 0xA900."""
    element = ds.get_item(0x0008_0016)
    value = element.value if element is not None else None
    ds_class = (value.decode("ascii", "replace") if isinstance(value, bytes)
                else str(value or "")).strip("\x00 ")
    if not ds_class:
        raise StoreRefused(NOT_SOP_CLASS, "missing SOPClassUID")
    if ds_class != command_class:
        raise StoreRefused(NOT_SOP_CLASS, "SOPClassUID differs from the command's")
    if is_image_storage(ds_class) and not has_pixel_data(ds):
        raise StoreRefused(NOT_SOP_CLASS, "image storage instance without Pixel Data")


def _discard(writing: Future) -> None:
    """Wait for a temporary file that will not be used, and remove it."""
    try:
        temp, _size = writing.result()
    except OSError:
        return
    temp.unlink(missing_ok=True)


def _accept_uid(_uid: object) -> tuple[bool, str]:
    return True, ""


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved out of the accept loop.

    pynetdicom wraps each accepted socket in TLS (and so handshakes) in the thread that
    accepts connections: one caller that connects and stays silent would stop every other.
    Here the accept loop only wraps the socket; the handshake runs in the connection's own
    thread, bounded by the ACSE timeout.

    A socket from ``accept()`` blocks without limit: a peer that stops half way through a
    PDU (a half-sent A-ASSOCIATE-RQ, garbage whose "length" promises more) would hold its
    thread and an association slot for ever. Each accepted socket gets the network timeout,
    so such a read fails after ``node.network_timeout_s`` and the connection is closed.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.ae.acse_timeout)
                request.do_handshake()
                request.settimeout(self.ae.network_timeout)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0],
                            getattr(exc, "reason", None) or type(exc).__name__)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _SharedPortServer(_Server):
    """A server that binds its port alongside other processes' (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Receiver:
    """The node's DICOM listener; :meth:`start` returns once it is listening."""

    def __init__(self, config: Config, spool: Spool, db: StateDB, shared_port: bool = False):
        """``shared_port``: other processes listen on the same port (SO_REUSEPORT) and the
        kernel spreads connections over them; ``node.max_associations`` is split evenly."""
        self.config = config
        self.shared_port = shared_port
        self.spool = spool
        self.db = db
        self.allow = AllowList.from_config(config.node.allowed_callers)
        self.min_free_bytes = config.storage.min_free_mb * 1024 * 1024
        self.server: ThreadedAssociationServer | None = None
        self._writer = ThreadPoolExecutor(max_workers=config.node.max_associations,
                                          thread_name_prefix="spool-writer")
        self._stats: WeakKeyDictionary[Any, Counter] = WeakKeyDictionary()
        self._accepting: threading.Thread | None = None
        self._stats_lock = threading.Lock()

    def build_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = -(-node.max_associations // node.receive_processes)
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = node.acse_timeout_s  # also pynetdicom's ARTIM timer
        ae.dimse_timeout = node.dimse_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def start(self) -> ThreadedAssociationServer:
        fastpath.install()
        # Accept every storage SOP class, private ones too, in the syntax it is sent in; skip
        # pynetdicom's per-message logging handlers (they cost ~5 % per image and can print
        # identifiers) and its regex check of every UID in every DIMSE message (the spool
        # checks the three UIDs it uses as path names).
        pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE = True
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        pynetdicom_config.VALIDATORS["UI"] = _accept_uid
        # Headers are only read to index them; checking every value against its VR on each
        # C-STORE costs more than the rest of the parse and changes nothing we store.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        node = self.config.node
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        ae = self.build_ae()
        self.server = ae.make_server(
            (node.host, node.port),
            evt_handlers=handlers,
            ssl_context=server_context(node.tls),
            server_class=_SharedPortServer if self.shared_port else _Server,
        )
        ae._servers.append(self.server)  # as AE.start_server does; server.shutdown() expects it
        self._accepting = threading.Thread(target=self.server.serve_forever,
                                           name="dicom-accept", daemon=True)
        self._accepting.start()
        scheme = "DICOM TLS" if node.tls.enabled else "DICOM"
        log.info("listening: %s AE %s on %s:%d", scheme, node.ae_title, node.host, node.port)
        return self.server

    def listening(self) -> bool:
        """The port is open and its accept loop runs (the readiness check)."""
        return (self.server is not None and self.server.socket.fileno() != -1
                and self._accepting is not None and self._accepting.is_alive())

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self._writer.shutdown(wait=True)

    # --- event handlers ----------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        """Reject callers that are not on ``node.allowed_callers``."""
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        address = assoc.requestor.address
        if self.allow.allows(calling, address):
            return
        log.warning(
            "association rejected: calling AE %r from %s is not in node.allowed_callers",
            calling, address,
        )
        self.db.add_event("association_rejected", calling_ae=calling, address=address,
                          reason="calling AE/host not in node.allowed_callers")
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ is out
        # before the connection is closed.
        assoc.kill()

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title.strip())
        return 0x0000

    def _on_store(self, event: evt.Event) -> int | Dataset:
        calling = event.assoc.requestor.ae_title.strip()
        try:
            record = self._store(event, calling)
        except Exception as exc:
            refused = exc if isinstance(exc, StoreRefused) else StoreRefused(
                INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            if refused is not exc:  # a bug, not the data: keep its traceback for us
                log.exception("C-STORE failed unexpectedly")
            self._count(event.assoc, f"0x{refused.status:04X}")
            self._record_refusal(refused, str(event.request.AffectedSOPInstanceUID), calling)
            response = Dataset()
            response.Status = refused.status
            response.ErrorComment = printable(refused.reason)[:64]  # LO: 64 characters
            return response
        self._count(event.assoc, "0x0000", record.size)
        return 0x0000

    def _record_refusal(self, refused: StoreRefused, sop_uid: str, calling: str) -> None:
        """Log and record a refused C-STORE; say so when a good copy of the instance was
        stored before (a damaged resend never replaces it)."""
        try:
            kept = self.db.stored_instance(sop_uid)
        except Exception:  # the DB itself may be what failed
            kept = None
        log.error("C-STORE refused from %s: 0x%04X %s (SOP instance %s)%s", calling,
                  refused.status, refused.reason, sop_uid,
                  "; the copy stored before is kept" if kept else "")
        try:
            self.db.add_event("store_failed", study_uid=kept and kept["study_uid"],
                              series_uid=kept and kept["series_uid"], sop_uid=sop_uid,
                              status=f"0x{refused.status:04X}", reason=refused.reason,
                              calling_ae=calling, kept_stored_copy=kept is not None)
        except Exception as exc:  # the answer must still go out, with its own status
            log.error("cannot record the refusal in the state DB: %s", type(exc).__name__)

    def _store(self, event: evt.Event, calling: str) -> InstanceRecord:
        """Write the instance to the spool and the DB, or raise :class:`StoreRefused`.

        The file is written (and fsynced) by a helper thread while this one walks the
        header: the write waits on the kernel and the disk, the walk on the interpreter.
        """
        request = event.request
        data = request.DataSet.getbuffer()
        if self.spool.free_bytes() - len(data) < self.min_free_bytes:
            raise StoreRefused(OUT_OF_RESOURCES, "free disk below storage.min_free_mb")
        transfer_syntax = UID(event.context.transfer_syntax)
        header = part10_header(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID,
                               transfer_syntax)
        writing = self._write_temporary([header, data])
        try:
            path, ds = self._check(request, transfer_syntax)
        except StoreRefused:
            _discard(writing)
            raise
        try:
            temp, size = writing.result()
            self.spool.commit(temp, path)
        except OSError as exc:
            _discard(writing)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(OUT_OF_RESOURCES, "disk full") from exc
            raise StoreRefused(WRITE_FAILED, f"spool write failed: {exc.strerror}") from exc
        try:
            record = InstanceRecord.from_dataset(
                ds, path=path, size=size, transfer_syntax=transfer_syntax,
                calling_ae=calling, received_at=time.time())
            recorded = self.db.record_instance(record)
        except Exception as exc:
            raise StoreRefused(DB_FAILED, f"state DB error: {type(exc).__name__}") from exc
        if recorded.superseded:  # the same SOP Instance UID was sent in another series before
            Path(recorded.superseded).unlink(missing_ok=True)
        if recorded.reopened:
            log.info("late arrival re-opens series %s", record.series_uid)
        if recorded.completed:
            log.info("series complete (expected count reached): %s", record.series_uid)
        return record

    def _write_temporary(self, chunks: list) -> Future:
        """Start writing the instance to a temporary file. With fsync on, a helper thread
        writes and fsyncs while this one walks the header; with it off the write is a
        memory copy, cheaper done here than handed to another thread (~0.1 ms)."""
        if self.spool.fsync:
            return self._writer.submit(self.spool.write_temporary, chunks)
        done: Future = Future()
        try:
            done.set_result(self.spool.write_temporary(chunks))
        except OSError as exc:
            done.set_exception(exc)
        return done

    def _check(self, request: Any, transfer_syntax: UID) -> tuple[Path, Dataset]:
        """Walk the data set's header: the instance's spool path, and the header itself."""
        if not transfer_syntax.is_transfer_syntax:
            raise StoreRefused(CANNOT_DECODE, f"unsupported transfer syntax {transfer_syntax}")
        try:
            ds = read_header(request.DataSet, transfer_syntax)
        except Exception as exc:
            raise StoreRefused(CANNOT_DECODE, _why_undecodable(exc)) from exc
        try:
            study_uid, series_uid, sop_uid = instance_uids(ds)
        except MissingUID as exc:
            raise StoreRefused(BAD_UIDS, str(exc)) from exc
        if sop_uid != request.AffectedSOPInstanceUID:
            raise StoreRefused(UID_MISMATCH, "SOPInstanceUID differs from the command's")
        try:
            path = self.spool.path_for(study_uid, series_uid, sop_uid)
        except InvalidUID as exc:
            raise StoreRefused(BAD_UIDS, str(exc)) from exc
        _check_sop_class(ds, str(request.AffectedSOPClassUID))
        return path, ds

    def _count(self, assoc: Any, status: str, size: int = 0) -> None:
        with self._stats_lock:
            stats = self._stats.setdefault(assoc, Counter())
            stats[status] += 1
            stats["bytes"] += size

    def _on_closed(self, event: evt.Event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(event.assoc, Counter())
        bytes_received = stats.pop("bytes", 0)
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info("association %s: calling AE %s, %d MB, statuses %s", how,
                 event.assoc.requestor.ae_title.strip(), bytes_received // 1_000_000,
                 dict(stats) or "{}")
