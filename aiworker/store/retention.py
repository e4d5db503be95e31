"""Retention: received studies and their results leave the node once they are delivered.

A study is **delivered** when it is complete, a pipeline has decided on its latest
completion, no job of it is queued or running, every done job has been handed to the
outbox (its rows queued, or its pipeline sends nowhere) and every outbox row of its jobs is
``sent``. Studies with a failed job or a dead row stay until an operator purges them (they
are on the failures page for a reason).

* Age: a delivered study whose last instance arrived more than ``storage.retention_days``
  ago is removed (0 keeps every study).
* Emergency: while the data disk has less than ``storage.emergency_free_percent`` free, the
  oldest delivered studies are removed first, whatever their age.
* By hand: ``aiworker purge STUDY_UID`` forgets a study now, delivered or not (a study with
  a job queued or running only with ``--force``).

Removing a study (:func:`purge_study`) deletes its spool files and result folders first,
then, in one transaction, the rows of those instances and of its jobs, outbox rows and
selections, and the series and study rows left without instances, adding a
``study_purged`` event (counts and reason, no patient data). A crash in between leaves rows
whose files are gone: the start-up reconcile marks them missing and the next pass removes
them. An instance that arrives while its study is removed is not among the rows removed,
so it stays, with its study.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from aiworker.polling import PollingStage
from aiworker.store.db import StateDB
from aiworker.store.disk import free_mb
from aiworker.store.layout import DataPaths
from aiworker.store.outbox import Outbox

log = logging.getLogger("aiworker.store")

DAY_S = 86400.0
PURGED = "study_purged"
_DELIVERED = """
SELECT s.study_uid FROM studies s
WHERE s.state = 'complete' AND s.last_received < ?
  AND EXISTS (SELECT 1 FROM selections d WHERE d.study_uid = s.study_uid
              AND d.completed_at = s.completed_at)
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid
                  AND (j.state NOT IN ('done', 'superseded')
                       OR (j.state = 'done' AND j.dispatched_at IS NULL AND NOT EXISTS
                           (SELECT 1 FROM outbox o WHERE o.job_id = j.job_id))))
  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid AND o.state != 'sent')
ORDER BY s.last_received, s.study_uid
"""


class PurgeRefused(Exception):
    """The study is unknown, or still has work in flight (and no ``force``)."""


@dataclass(frozen=True)
class Purged:
    """What removing one study freed."""

    study_uid: str
    instances: int
    bytes: int
    jobs: int
    reason: str


@dataclass(frozen=True)
class RetentionPolicy:
    """How long delivered studies stay, and the free-space floor that removes them early."""

    retention_days: float = 30.0
    emergency_free_percent: float = 10.0


def open_tables(db: StateDB) -> None:
    """Make sure every table retention reads is there (the outbox's is made on first use)."""
    Outbox(db)


def delivered_studies(db: StateDB, last_received_before: float) -> list[str]:
    """Delivered studies whose last instance arrived before the given time, oldest first."""
    return [row["study_uid"] for row in db.query(_DELIVERED, (last_received_before,))]


def purge_study(db: StateDB, paths: DataPaths, study_uid: str, reason: str,
                force: bool = False) -> Purged:
    """Remove one study's files and rows (see the module docstring); raises
    :class:`PurgeRefused` for an unknown study, or one with a job queued or running unless
    ``force``."""
    instances = db.query("SELECT sop_uid, path, size FROM instances WHERE study_uid = ?",
                         (study_uid,))
    jobs = db.query("SELECT job_id, state, result_dir FROM jobs WHERE study_uid = ?",
                    (study_uid,))
    if not instances and not db.query("SELECT 1 FROM studies WHERE study_uid = ?",
                                      (study_uid,)):
        raise PurgeRefused(f"no study {study_uid}")
    busy = [job["job_id"] for job in jobs if job["state"] in ("queued", "running")]
    if busy and not force:
        raise PurgeRefused(f"study {study_uid} has jobs in flight ({', '.join(busy)}); "
                           "wait for them, or force")
    for instance in instances:
        Path(instance["path"]).unlink(missing_ok=True)
    for job in jobs:
        shutil.rmtree(paths.result_folder(job["job_id"]).path, ignore_errors=True)
    _remove_empty_folders(paths.spool / study_uid)
    purged = Purged(study_uid, len(instances), sum(row["size"] for row in instances),
                    len(jobs), reason)
    _forget_rows(db, purged, [row["sop_uid"] for row in instances],
                 [job["job_id"] for job in jobs])
    log.info("study %s purged (%s): %d instances, %d bytes, %d jobs", study_uid, reason,
             purged.instances, purged.bytes, purged.jobs)
    return purged


def _forget_rows(db: StateDB, purged: Purged, sop_uids: list[str], job_ids: list[str]) -> None:
    """The rows of the removed instances and jobs, and what is left without them."""
    with db.transaction() as cur:
        cur.executemany("DELETE FROM instances WHERE sop_uid = ?", [(u,) for u in sop_uids])
        for table in ("outbox", "jobs"):
            cur.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(j,) for j in job_ids])
        cur.execute("DELETE FROM series WHERE study_uid = ? AND NOT EXISTS (SELECT 1 FROM"
                    " instances i WHERE i.series_uid = series.series_uid)", (purged.study_uid,))
        left = cur.execute("SELECT COUNT(*) FROM instances WHERE study_uid = ?",
                           (purged.study_uid,)).fetchone()[0]
        if not left:
            cur.execute("DELETE FROM selections WHERE study_uid = ?", (purged.study_uid,))
            cur.execute("DELETE FROM studies WHERE study_uid = ?", (purged.study_uid,))
        detail = {"reason": purged.reason, "instances": purged.instances,
                  "bytes": purged.bytes, "jobs": purged.jobs}
        cur.execute("INSERT INTO events (at, kind, study_uid, detail) VALUES (?, ?, ?, ?)",
                    (time.time(), PURGED, purged.study_uid, json.dumps(detail)))


def _remove_empty_folders(folder: Path) -> None:
    """``folder`` and its sub-folders, where they hold no file any more."""
    if not folder.is_dir():
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir():
            _rmdir_if_empty(sub)
    _rmdir_if_empty(folder)


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (an instance arrived meanwhile), or gone
        pass


def free_percent(folder: Path) -> float:
    """Free space on ``folder``'s disk, in percent of its size."""
    usage = shutil.disk_usage(folder)
    return 100.0 * usage.free / usage.total if usage.total else 100.0


def apply_retention(db: StateDB, paths: DataPaths, policy: RetentionPolicy,
                    now: float | None = None) -> list[Purged]:
    """One pass: every delivered study past the age, then the oldest delivered ones while
    the disk is below the emergency floor; what was removed."""
    now = time.time() if now is None else now
    purged = []
    if policy.retention_days > 0:
        for study_uid in delivered_studies(db, now - policy.retention_days * DAY_S):
            purged.append(purge_study(db, paths, study_uid, "age"))
    if policy.emergency_free_percent > 0:
        for study_uid in delivered_studies(db, now):
            if free_percent(paths.root) >= policy.emergency_free_percent:
                break
            purged.append(purge_study(db, paths, study_uid, "disk"))
            log.warning("free disk below storage.emergency_free_percent (%g %%, %d MB free):"
                        " removed the oldest delivered study", policy.emergency_free_percent,
                        free_mb(paths.root))
    return purged


class RetentionStage(PollingStage):
    """Runs :func:`apply_retention` at start and every ``interval_s`` until stopped."""

    name = "retention"

    def __init__(self, db: StateDB, paths: DataPaths, policy: RetentionPolicy,
                 interval_s: float):
        super().__init__(interval_s)
        self.db, self.paths, self.policy = db, paths, policy
        open_tables(db)

    def tick(self) -> list[Purged]:
        return apply_retention(self.db, self.paths, self.policy)
