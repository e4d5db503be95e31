"""Sending an export to a configured destination (``aiworker export ... --to pacs``).

The de-identified files go out through the outbox's own senders
(:func:`~aiworker.dispatch.outbox.default_senders`: C-STORE for ``kind: dicom``, STOW-RS
for ``kind: dicomweb``), with their outcome rules and the destination's timeouts and
credentials, in batches of :data:`BATCH` files. Nothing is queued in the outbox (its rows
belong to jobs): what is not sent is reported, and the command is simply run again with
the first run's mapping (``--reuse-mapping``), which gives every file the same UIDs, so
the receiver stores each instance once however often it is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiworker.dispatch.outbox import SENT, default_senders

BATCH = 50  # files per association or STOW-RS request
SENDABLE = ("dicom", "dicomweb")


class SendError(Exception):
    """A destination that takes no DICOM objects (an HL7 one)."""


@dataclass
class SendReport:
    """What became of an export sent to a destination: files sent, and those that were
    not with the outcome (``retry``: worth running again; ``dead``: refused) and why."""

    destination: str
    sent: int = 0
    not_sent: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.not_sent


def check_sendable(name: str, destination: Any) -> None:
    """Raise :class:`SendError` unless ``destination`` takes DICOM objects."""
    if destination.kind not in SENDABLE:
        raise SendError(f"destination {name!r} is kind {destination.kind}: an export goes "
                        f"to a folder or a destination of kind {' or '.join(SENDABLE)}")


def send_export(out_dir: Path, files: Sequence[str], name: str, destination: Any,
                calling_ae: str) -> SendReport:
    """Send the export's ``files`` (relative to ``out_dir``) to ``destination`` (the
    config's section of that ``name``), calling as ``calling_ae`` over DIMSE."""
    check_sendable(name, destination)
    sender = default_senders(calling_ae)[destination.kind]
    report = SendReport(name)
    for start in range(0, len(files), BATCH):
        batch = list(files[start:start + BATCH])
        outcomes = sender(destination, [str(out_dir / f) for f in batch])
        for file, outcome in zip(batch, outcomes, strict=True):
            if outcome.state == SENT:
                report.sent += 1
            else:
                report.not_sent.append({"file": file, "outcome": outcome.state,
                                        "reason": outcome.reason})
    return report
