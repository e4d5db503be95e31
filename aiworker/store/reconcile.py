"""Start-up reconcile: make the state DB and the spool agree after any crash.

Three repairs, in order:

1. temporary files left by interrupted writes are removed (they were never acknowledged);
2. DB rows whose file is gone are marked ``missing`` (counts drop, an event says so);
3. spool files the DB does not know (written, fsynced and renamed, but the crash came before
   the DB commit reached disk) are read and indexed; a file that cannot be read as DICOM is
   moved to ``quarantine/`` with an event, so later stages never see it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from aiworker.store.db import StateDB
from aiworker.store.records import InstanceRecord
from aiworker.store.spool import Spool

log = logging.getLogger("aiworker.store")


@dataclass(frozen=True)
class ReconcileReport:
    temporaries_removed: int
    marked_missing: int
    indexed: int
    quarantined: int


def reconcile(spool: Spool, db: StateDB, quarantine: Path) -> ReconcileReport:
    """Bring DB and spool into agreement; see the module docstring."""
    removed = 0
    for temp in list(spool.temporary_files()):
        temp.unlink(missing_ok=True)
        removed += 1

    known = db.stored_instance_paths()
    gone = [sop for sop, path in known.items() if not Path(path).is_file()]
    if gone:
        db.mark_missing(gone)

    known_paths = set(known.values())
    indexed = quarantined = 0
    for path in spool.instance_files():
        if str(path) in known_paths:
            continue
        if _index_file(path, db):
            indexed += 1
        else:
            _quarantine(path, quarantine, db)
            quarantined += 1

    report = ReconcileReport(removed, len(gone), indexed, quarantined)
    if any(vars(report).values()):
        log.warning("reconcile: %s", report)
        db.add_event("reconcile", **vars(report))
    return report


def _index_file(path: Path, db: StateDB) -> bool:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stat = path.stat()
        record = InstanceRecord.from_dataset(
            ds,
            path=path,
            size=stat.st_size,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            calling_ae="",
            received_at=stat.st_mtime,
        )
    except Exception as exc:  # any unreadable file is quarantined, whatever the reason
        log.error("reconcile: cannot index %s: %s", path.name, type(exc).__name__)
        return False
    if path.parent.name != record.series_uid or path.stem != record.sop_uid:
        log.error("reconcile: %s does not match its header's UIDs", path.name)
        return False
    db.record_instance(record)
    return True


def _quarantine(path: Path, quarantine: Path, db: StateDB) -> None:
    quarantine.mkdir(parents=True, exist_ok=True)
    target = quarantine / f"{int(time.time())}-{path.name}"
    path.rename(target)
    db.add_event("quarantined", path=str(target), reason="unreadable or mismatched spool file")
