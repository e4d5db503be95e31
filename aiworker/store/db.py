"""The state DB: studies, series, instances and events, in SQLite (WAL) under the data dir.

Plain SQL that PostgreSQL also accepts, so a site can move the state to a shared server
later. One connection guarded by a lock serves every thread; each call is one short
transaction.

Durability: the DB runs with ``synchronous=NORMAL``. A committed row can be lost by a power
cut, but the instance file it describes is already fsynced in the spool, and the start-up
reconcile (:mod:`aiworker.store.reconcile`) indexes spool files the DB lacks. The spool is
the record of what was received; the DB is the index of it.

States: a series and a study are ``receiving`` or ``complete``; an instance is ``stored`` or
``missing`` (its file vanished). ``series.closed_by`` says which rule completed a series:
``expected_count`` (as many frames as the header announced) or ``idle_timer``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiworker.store.records import InstanceRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid         TEXT PRIMARY KEY,
    patient_id        TEXT,
    patient_name      TEXT,
    accession_number  TEXT,
    study_date        TEXT,
    study_description TEXT,
    calling_ae        TEXT,
    first_received    REAL NOT NULL,
    last_received     REAL NOT NULL,
    state             TEXT NOT NULL,
    completed_at      REAL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid         TEXT PRIMARY KEY,
    study_uid          TEXT NOT NULL REFERENCES studies (study_uid),
    modality           TEXT,
    series_number      INTEGER,
    series_description TEXT,
    sop_class_uid      TEXT,
    calling_ae         TEXT,
    first_received     REAL NOT NULL,
    last_received      REAL NOT NULL,
    instance_count     INTEGER NOT NULL DEFAULT 0,
    frame_count        INTEGER NOT NULL DEFAULT 0,
    bytes              INTEGER NOT NULL DEFAULT 0,
    expected_frames    INTEGER,
    state              TEXT NOT NULL,
    closed_by          TEXT,
    completed_at       REAL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid         TEXT PRIMARY KEY,
    series_uid      TEXT NOT NULL REFERENCES series (series_uid),
    study_uid       TEXT NOT NULL,
    sop_class_uid   TEXT,
    transfer_syntax TEXT,
    path            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    frames          INTEGER NOT NULL,
    acquisition_number INTEGER,
    calling_ae      TEXT,
    received_at     REAL NOT NULL,
    state           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS events (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    kind       TEXT NOT NULL,
    study_uid  TEXT,
    series_uid TEXT,
    sop_uid    TEXT,
    detail     TEXT
);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind);
"""

# Events an operator must see: something was refused, lost or repaired.
PROBLEM_EVENTS = ("store_failed", "association_rejected", "instance_missing", "quarantined",
                  "reconcile")

RECEIVING = "receiving"
COMPLETE = "complete"
STORED = "stored"
MISSING = "missing"


@dataclass(frozen=True)
class Recorded:
    """What recording one instance changed."""

    new: bool  # False when the SOP Instance UID was already stored (a resend)
    reopened: bool  # the series had been complete: a late arrival
    completed: bool  # this instance completed the series by its expected count
    superseded: str | None = None  # the file of the same SOP Instance UID at another path


class StateDB:
    """Thread-safe access to the state DB."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._lock = threading.Lock()
        with self._transaction() as cur:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- receiving ---------------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord) -> Recorded:
        """Record a stored instance: upsert study, series and instance; apply completion rules."""
        with self._transaction() as cur:
            _upsert_study(cur, rec)
            before = cur.execute(
                "SELECT state FROM series WHERE series_uid = ?", (rec.series_uid,)
            ).fetchone()
            _upsert_series(cur, rec)
            old = cur.execute(
                "SELECT series_uid, path, state FROM instances WHERE sop_uid = ?", (rec.sop_uid,)
            ).fetchone()
            _upsert_instance(cur, rec)
            if old is not None and old["series_uid"] != rec.series_uid:
                _recount(cur, old["series_uid"])
            count, frames, expected = _recount(cur, rec.series_uid)
            reopened = before is not None and before["state"] == COMPLETE
            if before is None:
                _event(cur, "series_started", rec.study_uid, rec.series_uid, rec.sop_uid,
                       calling_ae=rec.calling_ae, modality=rec.modality)
            if reopened:
                _event(cur, "late_arrival", rec.study_uid, rec.series_uid, rec.sop_uid,
                       calling_ae=rec.calling_ae)
            completed = expected is not None and frames >= expected
            if completed:
                _complete_series(cur, rec.series_uid, rec.study_uid, rec.received_at,
                                 "expected_count", instances=count, frames=frames)
        moved = old is not None and old["path"] != str(rec.path)
        return Recorded(new=old is None or old["state"] != STORED, reopened=reopened,
                        completed=completed, superseded=old["path"] if moved else None)

    def complete_idle(self, now: float, stable_seconds: float) -> list[str]:
        """Complete series (and studies) that received nothing for ``stable_seconds``.

        A study completes when all of its series are complete and the study itself has been
        idle for the same time, so a series that closed early by its expected count cannot
        complete a study whose next series has not started yet. Returns completed series UIDs.
        """
        cutoff = now - stable_seconds
        with self._transaction() as cur:
            idle = cur.execute(
                "SELECT series_uid, study_uid, instance_count, frame_count FROM series"
                " WHERE state = ? AND last_received <= ?",
                (RECEIVING, cutoff),
            ).fetchall()
            for row in idle:
                _complete_series(cur, row["series_uid"], row["study_uid"], now, "idle_timer",
                                 instances=row["instance_count"], frames=row["frame_count"])
            studies = cur.execute(
                "SELECT study_uid FROM studies s WHERE state = ? AND last_received <= ?"
                " AND NOT EXISTS (SELECT 1 FROM series r WHERE r.study_uid = s.study_uid"
                " AND r.state = ?)",
                (RECEIVING, cutoff, RECEIVING),
            ).fetchall()
            for row in studies:
                cur.execute(
                    "UPDATE studies SET state = ?, completed_at = ? WHERE study_uid = ?",
                    (COMPLETE, now, row["study_uid"]),
                )
                _event(cur, "study_completed", row["study_uid"], None, None)
        return [row["series_uid"] for row in idle]

    def add_event(self, kind: str, study_uid: str | None = None, series_uid: str | None = None,
                  sop_uid: str | None = None, **detail: Any) -> None:
        """Record something that happened (an error, a rejection) for the dashboard and CLI."""
        with self._transaction() as cur:
            _event(cur, kind, study_uid, series_uid, sop_uid, **detail)

    # --- reconcile ---------------------------------------------------------------------

    def stored_instance_paths(self) -> dict[str, str]:
        """SOP Instance UID -> path of every instance the DB believes is on disk."""
        rows = self._query("SELECT sop_uid, path FROM instances WHERE state = ?", (STORED,))
        return {row["sop_uid"]: row["path"] for row in rows}

    def mark_missing(self, sop_uids: list[str]) -> None:
        """Mark instances whose files are gone, recount their series, and log an event each."""
        with self._transaction() as cur:
            touched = set()
            for sop_uid in sop_uids:
                row = cur.execute(
                    "SELECT study_uid, series_uid FROM instances WHERE sop_uid = ?", (sop_uid,)
                ).fetchone()
                cur.execute("UPDATE instances SET state = ? WHERE sop_uid = ?", (MISSING, sop_uid))
                _event(cur, "instance_missing", row["study_uid"], row["series_uid"], sop_uid)
                touched.add(row["series_uid"])
            for series_uid in touched:
                _recount(cur, series_uid)

    # --- reading -----------------------------------------------------------------------

    def studies(self) -> list[dict[str, Any]]:
        """Every study, newest first, each with its series (in series-number order)."""
        rows = self._query("SELECT * FROM studies ORDER BY first_received DESC")
        studies = [dict(r) for r in rows]
        series = self._query("SELECT * FROM series ORDER BY series_number, first_received")
        by_study: dict[str, list[dict[str, Any]]] = {}
        for row in series:
            by_study.setdefault(row["study_uid"], []).append(dict(row))
        for study in studies:
            study["series"] = by_study.get(study["study_uid"], [])
        return studies

    def instances(self, series_uid: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM instances WHERE series_uid = ? ORDER BY received_at",
                           (series_uid,))
        return [dict(r) for r in rows]

    def events(self, kinds: tuple[str, ...] = (), limit: int = 100) -> list[dict[str, Any]]:
        """The newest events first, optionally only those of the given kinds."""
        sql = "SELECT * FROM events"
        if kinds:
            sql += f" WHERE kind IN ({', '.join('?' * len(kinds))})"
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*kinds, limit))
        return [dict(r, detail=json.loads(r["detail"] or "{}")) for r in rows]


def _upsert_study(cur: sqlite3.Cursor, rec: InstanceRecord) -> None:
    cur.execute(
        "INSERT INTO studies (study_uid, patient_id, patient_name, accession_number, study_date,"
        " study_description, calling_ae, first_received, last_received, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (study_uid) DO UPDATE SET last_received = excluded.last_received,"
        " state = excluded.state, completed_at = NULL",
        (rec.study_uid, rec.patient_id, rec.patient_name, rec.accession_number, rec.study_date,
         rec.study_description, rec.calling_ae, rec.received_at, rec.received_at, RECEIVING),
    )


def _upsert_series(cur: sqlite3.Cursor, rec: InstanceRecord) -> None:
    cur.execute(
        "INSERT INTO series (series_uid, study_uid, modality, series_number, series_description,"
        " sop_class_uid, calling_ae, first_received, last_received, expected_frames, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (series_uid) DO UPDATE SET last_received = excluded.last_received,"
        " expected_frames = COALESCE(excluded.expected_frames, series.expected_frames),"
        " state = excluded.state, closed_by = NULL, completed_at = NULL",
        (rec.series_uid, rec.study_uid, rec.modality, rec.series_number, rec.series_description,
         rec.sop_class_uid, rec.calling_ae, rec.received_at, rec.received_at,
         rec.expected_frames, RECEIVING),
    )


def _upsert_instance(cur: sqlite3.Cursor, rec: InstanceRecord) -> None:
    cur.execute(
        "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax,"
        " path, size, frames, acquisition_number, calling_ae, received_at, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (sop_uid) DO UPDATE SET series_uid = excluded.series_uid,"
        " study_uid = excluded.study_uid, sop_class_uid = excluded.sop_class_uid,"
        " transfer_syntax = excluded.transfer_syntax, path = excluded.path,"
        " size = excluded.size, frames = excluded.frames,"
        " acquisition_number = excluded.acquisition_number, calling_ae = excluded.calling_ae,"
        " received_at = excluded.received_at, state = excluded.state",
        (rec.sop_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid, rec.transfer_syntax,
         str(rec.path), rec.size, rec.frames, rec.acquisition_number, rec.calling_ae,
         rec.received_at, STORED),
    )


def _recount(cur: sqlite3.Cursor, series_uid: str) -> tuple[int, int, int | None]:
    """Set a series' instance, frame and byte counts from its stored instances.

    Returns (instances, frames, expected frames). The expected count comes from
    ImagesInAcquisition, which counts one acquisition's images: once a second
    AcquisitionNumber shows up it no longer says when the series ends, and it is returned
    as None so that the idle timer decides.
    """
    count, frames, size, acquisitions = cur.execute(
        "SELECT COUNT(*), COALESCE(SUM(frames), 0), COALESCE(SUM(size), 0),"
        " COUNT(DISTINCT acquisition_number) FROM instances WHERE series_uid = ? AND state = ?",
        (series_uid, STORED),
    ).fetchone()
    (expected,) = cur.execute(
        "UPDATE series SET instance_count = ?, frame_count = ?, bytes = ? WHERE series_uid = ?"
        " RETURNING expected_frames",
        (count, frames, size, series_uid),
    ).fetchone()
    return count, frames, expected if acquisitions <= 1 else None


def _complete_series(cur: sqlite3.Cursor, series_uid: str, study_uid: str, at: float,
                     rule: str, **detail: Any) -> None:
    cur.execute(
        "UPDATE series SET state = ?, closed_by = ?, completed_at = ? WHERE series_uid = ?",
        (COMPLETE, rule, at, series_uid),
    )
    _event(cur, "series_completed", study_uid, series_uid, None, rule=rule, **detail)


def _event(cur: sqlite3.Cursor, kind: str, study_uid: str | None, series_uid: str | None,
           sop_uid: str | None, **detail: Any) -> None:
    cur.execute(
        "INSERT INTO events (at, kind, study_uid, series_uid, sop_uid, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), kind, study_uid, series_uid, sop_uid, json.dumps(detail) if detail else None),
    )
