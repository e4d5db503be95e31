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

import logging
import socket
import ssl
import threading
from collections import Counter
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
from aiworker.receive.instances import (
    BAD_UIDS,
    CANNOT_DECODE,
    DB_FAILED,
    INTERNAL_ERROR,
    NOT_SOP_CLASS,
    OUT_OF_RESOURCES,
    UID_MISMATCH,
    WRITE_FAILED,
    InstanceStore,
    StoreRefused,
)
from aiworker.receive.tls import server_context
from aiworker.store.db import StateDB
from aiworker.store.records import InstanceRecord
from aiworker.store.spool import Spool, printable

__all__ = ["BAD_UIDS", "CANNOT_DECODE", "DB_FAILED", "INTERNAL_ERROR", "NOT_SOP_CLASS",
           "OUT_OF_RESOURCES", "UID_MISMATCH", "WRITE_FAILED", "Receiver", "StoreRefused"]

log = logging.getLogger("aiworker.receive")


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
        self.instances = InstanceStore(spool, db, config.storage.min_free_mb,
                                       writers=config.node.max_associations)
        self.server: ThreadedAssociationServer | None = None
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
        self.instances.close()

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
            self.instances.record_refusal(refused, str(event.request.AffectedSOPInstanceUID),
                                          calling)
            response = Dataset()
            response.Status = refused.status
            response.ErrorComment = printable(refused.reason)[:64]  # LO: 64 characters
            return response
        self._count(event.assoc, "0x0000", record.size)
        return 0x0000

    def _store(self, event: evt.Event, calling: str) -> InstanceRecord:
        """Store the C-STORE's data set (:meth:`InstanceStore.store`), as the command names
        it, in the negotiated transfer syntax."""
        request = event.request
        return self.instances.store(str(request.AffectedSOPClassUID),
                                    str(request.AffectedSOPInstanceUID),
                                    UID(event.context.transfer_syntax), request.DataSet, calling)

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
