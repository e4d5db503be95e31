"""The outbox dispatcher: sends due outbox rows to their destinations and records outcomes.

Each :meth:`Dispatcher.tick` claims one batch of due rows per destination and sends the
batches at the same time, one thread per destination, so a destination that is down or
slow never holds up another; an exception in one destination's send is caught and
recorded on that destination's rows only. Senders are looked up by the destination's
kind (``dicom``, ``hl7``, ``dicomweb``: :mod:`aiworker.dispatch.dicomweb`, STOW-RS with
the same retry rules): a sender is ``sender(destination, paths) -> [Outcome per
path]``.

DICOM (:func:`send_dicom`): one association per batch, proposing one presentation context
per (SOP class, transfer syntax) of the batch's files with the file's own transfer syntax
first and explicit and implicit VR little endian as fallbacks. Outcome rules:

* status 0x0000 or a warning (0x0001, 0xBxxx): ``sent``;
* 0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand) and 0x0122
  (SOP class not supported): ``dead`` - the same bytes would fail the same way;
* a SOP class the receiver rejected in the association negotiation (no accepted
  presentation context for it): ``dead`` for its files, naming the abstract syntax
  ("PACS rejected Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4)"); the files of the
  classes it accepted are sent (a SEG rejected, the SR still goes);
* any other failure status (0xA7xx out of resources, ...), no response, or an association
  that was rejected, aborted or never made: ``retry`` (for every file not yet answered),
  until the destination's retry horizon makes the row dead;

Timeouts are the destination's: ``connect_timeout_s`` (TCP connect), ``acse_timeout_s``
(the A-ASSOCIATE answer: a single-association PACS still busy with a dead peer's association
answers nothing) and ``dimse_timeout_s`` (each C-STORE response, and the longest silence);
* an object file that is missing or not DICOM: ``dead``.

HL7 (:func:`send_hl7`): each path is a message file sent with
:func:`aiworker.dispatch.mllp.send_mllp`; its ``delivered``/``retry``/``dead`` map to
``sent``/``retry``/``dead``. When no acknowledgment came (the receiver is unreachable),
the rest of the batch is left for the next attempt instead of waiting on each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from aiworker.dispatch.mllp import DELIVERED, send_mllp
from aiworker.dispatch.requestor import associate
from aiworker.store.db import StateDB
from aiworker.store.outbox import Outbox, OutboxRow, RetryPolicy

log = logging.getLogger(__name__)

SENT, RETRY, DEAD = "sent", "retry", "dead"
BATCH_SIZE = 64  # at most 64 (SOP class, transfer syntax) pairs: within DICOM's 128 contexts


@dataclass(frozen=True)
class Outcome:
    """What became of one object: ``sent``, ``retry`` or ``dead``, and why if not sent."""

    state: str
    reason: str = ""


Sender = Callable[[Any, Sequence[str]], list[Outcome]]


@dataclass(frozen=True)
class DestinationReport:
    """One destination's part of a tick: counts per outcome, or the error that stopped it."""

    sent: int = 0
    retry: int = 0
    dead: int = 0
    error: str | None = None


def dicom_status_outcome(status: int) -> Outcome:
    """The outcome of one C-STORE response status (see the module's rules)."""
    if status == 0x0000 or status == 0x0001 or status & 0xF000 == 0xB000:
        return Outcome(SENT)
    permanent = (status & 0xFF00 == 0xA900 or status & 0xF000 == 0xC000
                 or status == 0x0122)
    return Outcome(DEAD if permanent else RETRY, f"C-STORE status 0x{status:04X}")


@dataclass(frozen=True)
class Timeouts:
    """The timeouts of one send, in seconds."""

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0

    @classmethod
    def of(cls, destination: Any, override: float | None = None) -> Timeouts:
        """The destination's timeouts (its ``*_timeout_s``), or ``override`` for each."""
        if override is not None:
            return cls(override, override, override)
        return cls(getattr(destination, "connect_timeout_s", cls.connect),
                   getattr(destination, "acse_timeout_s", cls.acse),
                   getattr(destination, "dimse_timeout_s", cls.dimse))


def send_dicom(destination: Any, paths: Sequence[str], calling_ae: str = "AIWORKER",
               timeout_s: float | None = None) -> list[Outcome]:
    """C-STORE ``paths`` to ``destination`` (host, port, ae_title) over one association,
    with the destination's timeouts (or ``timeout_s`` for all of them)."""
    outcomes: dict[int, Outcome] = {}
    described = []
    for i, path in enumerate(paths):
        try:
            meta = read_file_meta_info(path)
            described.append((i, path, str(meta.MediaStorageSOPClassUID),
                              str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError) as error:
            outcomes[i] = Outcome(DEAD, f"object file unreadable: {error.__class__.__name__}")
    if described:
        outcomes.update(_store_batch(destination, described, calling_ae,
                                     Timeouts.of(destination, timeout_s)))
    return [outcomes[i] for i in range(len(paths))]


def _store_batch(destination: Any, described: list[tuple[int, str, str, str]],
                 calling_ae: str, timeouts: Timeouts) -> dict[int, Outcome]:
    """Send readable files over one association; every file gets an outcome."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = ae.network_timeout = timeouts.dimse
    for sop_class, syntax in sorted({(sop, ts) for _, _, sop, ts in described}):
        syntaxes = list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        ae.add_requested_context(sop_class, syntaxes)
    where = f"{destination.ae_title} at {destination.host}:{destination.port}"
    assoc = associate(ae, destination.host, destination.port, ae_title=destination.ae_title,
                         max_pdu=0)
    outcomes = _rejected_classes(assoc, described, destination.ae_title)
    if not assoc.is_established:
        why = f"rejected the association: {where}" if assoc.is_rejected else (
            f"no association: {where} (refused, or no answer within {timeouts.acse:g} s)")
        return {i: outcomes.get(i, Outcome(RETRY, why)) for i, *_ in described}
    try:
        for i, path, _, _ in described:
            if i in outcomes:
                continue
            if not assoc.is_established:
                outcomes[i] = Outcome(RETRY, f"association with {where} lost")
                continue
            outcomes[i] = _store_one(assoc, path)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _rejected_classes(assoc: Any, described: list[tuple[int, str, str, str]],
                      peer: str) -> dict[int, Outcome]:
    """Dead outcomes for the files whose SOP class the peer accepted no presentation
    context for, once the negotiation got an answer (it also answers when the peer
    accepted none and pynetdicom aborts)."""
    if not assoc.rejected_contexts:
        return {}
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    return {i: Outcome(DEAD, f"{peer} rejected {UID(sop_class).name} ({sop_class})")
            for i, _, sop_class, _ in described if sop_class not in accepted}


def _store_one(assoc: Any, path: str) -> Outcome:
    """C-STORE one file on an established association."""
    try:
        response = assoc.send_c_store(Path(path))
    except ValueError as error:  # no accepted presentation context for its SOP class
        return Outcome(RETRY, f"not accepted by the receiver: {error}")
    if "Status" not in response:
        return Outcome(RETRY, "no C-STORE response (timeout or aborted)")
    return dicom_status_outcome(int(response.Status))


def send_hl7(destination: Any, paths: Sequence[str],
             timeout_s: float | None = None) -> list[Outcome]:
    """Send each HL7 message file to ``destination`` (host, port) over MLLP, with its
    ``connect_timeout_s`` and ``ack_timeout_s`` (or ``timeout_s`` for both)."""
    connect = timeout_s or getattr(destination, "connect_timeout_s", 10.0)
    ack = timeout_s or getattr(destination, "ack_timeout_s", 30.0)
    outcomes: list[Outcome] = []
    for path in paths:
        try:
            message = Path(path).read_bytes().decode("utf-8")  # keeps the \r separators
        except OSError as error:
            outcomes.append(Outcome(DEAD, f"message file unreadable: {error.__class__.__name__}"))
            continue
        delivery = send_mllp(destination.host, destination.port, message, ack, connect)
        if delivery.outcome == DELIVERED:
            outcomes.append(Outcome(SENT))
        elif delivery.ack_code is None:  # unreachable: the rest waits for the next attempt
            outcomes += [Outcome(RETRY, delivery.reason)] * (len(paths) - len(outcomes))
            break
        else:
            outcomes.append(Outcome(delivery.outcome, delivery.reason))
    return outcomes


def default_senders(calling_ae: str, timeout_s: float | None = None) -> dict[str, Sender]:
    """The senders for each destination kind; DICOM calls as the node's AE title. Without
    ``timeout_s`` each destination's own timeouts apply."""
    from aiworker.dispatch.dicomweb import send_dicomweb  # it builds on this module

    return {"dicom": partial(send_dicom, calling_ae=calling_ae, timeout_s=timeout_s),
            "hl7": partial(send_hl7, timeout_s=timeout_s),
            "dicomweb": partial(send_dicomweb, timeout_s=timeout_s)}


class Dispatcher:
    """Sends the outbox's due rows; call :meth:`recover` once at start, then :meth:`tick`
    whenever rows may be due (from a loop or a thread).

    ``destinations`` maps a name to its settings (``kind``, ``host``, ``port`` and, for
    DICOM, ``ae_title``: the config's destination sections); rows of a name it lacks stay
    pending, untouched, until a configuration names it again."""

    def __init__(self, db: StateDB, destinations: Mapping[str, Any],
                 senders: Mapping[str, Sender], clock: Callable[[], float] = time.time,
                 policy: RetryPolicy | None = None, batch_size: int = BATCH_SIZE,
                 policies: Mapping[str, RetryPolicy] | None = None):
        self.outbox = Outbox(db, policy, policies=policies)
        self.destinations = dict(destinations)
        self.senders = dict(senders)
        self.clock = clock
        self.batch_size = batch_size

    def recover(self) -> int:
        """Rows left ``sending`` by a crash are pending again; returns how many."""
        return self.outbox.recover(self.clock())

    def tick(self) -> dict[str, DestinationReport]:
        """Send one due batch per configured destination, all destinations at once."""
        now = self.clock()
        names = [n for n in self.outbox.due_destinations(now) if n in self.destinations]
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="outbox") as pool:
            reports = list(pool.map(partial(self.dispatch, now=now), names))
        return dict(zip(names, reports, strict=True))

    def dispatch(self, name: str, now: float) -> DestinationReport:
        """Claim, send and record one destination's batch; never raises."""
        rows = self.outbox.claim(name, now, self.batch_size)
        if not rows:
            return DestinationReport()
        try:
            destination = self.destinations[name]
            outcomes = self.senders[destination.kind](destination, [r.path for r in rows])
            if len(outcomes) != len(rows):
                raise RuntimeError(f"sender gave {len(outcomes)} outcomes for {len(rows)} rows")
        except Exception as error:  # a broken sender must not stop other destinations
            reason = f"{error.__class__.__name__}: {error}"
            log.exception("outbox destination %s: send failed", name)
            self.outbox.mark_failed([r.id for r in rows], reason, self.clock())
            return DestinationReport(retry=len(rows), error=reason)
        return self._record(name, rows, outcomes)

    def _record(self, name: str, rows: list[OutboxRow],
                outcomes: list[Outcome]) -> DestinationReport:
        """Write each row's outcome; log (ids only, no PHI) what did not go."""
        at = self.clock()
        sent = [r.id for r, o in zip(rows, outcomes, strict=True) if o.state == SENT]
        self.outbox.mark_sent(sent, at)
        died = retried = 0
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome.state == SENT:
                continue
            dead = self.outbox.mark_failed([row.id], outcome.reason, at,
                                           permanent=outcome.state == DEAD)
            died += len(dead)
            retried += 1 - len(dead)
            log.log(logging.ERROR if dead else logging.WARNING,
                    "outbox row %d (job %s, %s) to %s: %s", row.id, row.job_id,
                    "dead" if dead else "retry", name, outcome.reason)
        return DestinationReport(sent=len(sent), retry=retried, dead=died)
