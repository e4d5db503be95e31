"""DICOM SCU: C-ECHO and C-STORE of files to a remote AE (the CLI's ``echo`` and ``send``).

Files are sent as they are on disk, in their own transfer syntax, without decoding: each
association proposes one presentation context per (SOP class, transfer syntax) pair found
in the files, at most 128 per association as DICOM allows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from aiworker.dispatch.requestor import associate

MAX_CONTEXTS = 128


class SCUError(Exception):
    """The remote AE could not be reached or refused the association."""


@dataclass
class SendSummary:
    """Outcome of a send: counts per DIMSE status, plus files that could not be sent."""

    statuses: Counter = field(default_factory=Counter)
    unreadable: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreadable and set(self.statuses) <= {0x0000}


def echo(host: str, port: int, called_aet: str, calling_aet: str = "AIWORKER",
         timeout: float = 10) -> int:
    """Send a C-ECHO; return its status, or raise :class:`SCUError`."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = associate(ae, host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise SCUError(_why_not(assoc, host, port, called_aet))
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise SCUError("no C-ECHO response (timeout or aborted)")
    return int(status.Status)


def dicom_files(path: Path) -> list[Path]:
    """``path`` itself, or every regular file below it (sorted)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def send(files: Iterable[Path], host: str, port: int, called_aet: str,
         calling_aet: str = "AIWORKER", progress: Callable[[Path, int], None] | None = None,
         timeout: float = 30) -> SendSummary:
    """C-STORE every file; ``progress(path, status)`` is called after each one."""
    summary = SendSummary()
    described = []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            described.append((path, str(meta.MediaStorageSOPClassUID),
                              str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError):
            summary.unreadable.append(path)
    for batch in _batches(described):
        _send_batch(batch, host, port, called_aet, calling_aet, timeout, summary, progress)
    return summary


def _batches(described: list[tuple[Path, str, str]]) -> Iterator[list[tuple[Path, str, str]]]:
    """Split files so that no association needs more than 128 presentation contexts."""
    batch: list[tuple[Path, str, str]] = []
    pairs: set[tuple[str, str]] = set()
    for item in described:
        pair = (item[1], item[2])
        if pair not in pairs and len(pairs) == MAX_CONTEXTS:
            yield batch
            batch, pairs = [], set()
        pairs.add(pair)
        batch.append(item)
    if batch:
        yield batch


def _send_batch(batch: list[tuple[Path, str, str]], host: str, port: int, called_aet: str,
                calling_aet: str, timeout: float, summary: SendSummary,
                progress: Callable[[Path, int], None] | None) -> None:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    for sop_class, syntax in sorted({(sop, ts) for _, sop, ts in batch}):
        ae.add_requested_context(sop_class, [syntax])
    assoc = associate(ae, host, port, ae_title=called_aet, max_pdu=0)
    if not assoc.is_established:
        raise SCUError(_why_not(assoc, host, port, called_aet))
    try:
        for path, _, _ in batch:
            response = assoc.send_c_store(path)
            status = int(response.Status) if "Status" in response else -1
            summary.statuses[status] += 1
            if progress:
                progress(path, status)
            if not assoc.is_established:
                raise SCUError("association lost while sending")
    finally:
        if assoc.is_established:
            assoc.release()


def _why_not(assoc: object, host: str, port: int, called_aet: str) -> str:
    if getattr(assoc, "is_rejected", False):
        return (f"{called_aet} at {host}:{port} rejected the association"
                " (check AE titles and the allow-list)")
    return f"no association with {called_aet} at {host}:{port} (connection refused or timed out)"
