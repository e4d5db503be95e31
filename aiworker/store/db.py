"""The state DB: studies, series, instances and events, in SQLite (WAL) under the data dir,
or in a PostgreSQL database shared by several receivers and workers (``state.url``;
:mod:`aiworker.store.backend`). The same SQL runs on both. One connection guarded by a lock
serves every thread; each call is one short transaction.

A state change that hands work to the next stage defers that stage's job in the same
transaction (:attr:`StateDB.handoff`, :mod:`aiworker.store.handoff`): on PostgreSQL a
procrastinate job, on SQLite nothing (the stages poll the tables).

Durability: the DB runs with ``synchronous=NORMAL``. A committed row can be lost by a power
cut, but the instance file it describes is already fsynced in the spool, and the start-up
reconcile (:mod:`aiworker.store.reconcile`) indexes spool files the DB lacks. The spool is
the record of what was received; the DB is the index of it.

The state names are in :mod:`aiworker.store.states`; selections
(:mod:`aiworker.store.selections`) and the job lifecycle (:mod:`aiworker.store.jobs`) are
mixed into :class:`StateDB`, events are written by :mod:`aiworker.store.events`.
``series.closed_by`` says which rule completed a series: ``expected_count`` (as many frames
as the header announced) or ``idle_timer``.

An older DB opens as well: columns added since it was made are added to it at start.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiworker.store.backend import open_backend
from aiworker.store.events import write_event
from aiworker.store.handoff import NoHandoff, handoff_for
from aiworker.store.jobs import JobTable
from aiworker.store.records import InstanceRecord
from aiworker.store.schema import ADDED_COLUMNS, SCHEMA
from aiworker.store.selections import SelectionTable
from aiworker.store.states import COMPLETE, MISSING, RECEIVING, STORED
from aiworker.store.workers import WorkerTable


@dataclass(frozen=True)
class Recorded:
    """What recording one instance changed."""

    new: bool  # False when the SOP Instance UID was already stored (a resend)
    reopened: bool  # the series had been complete: a late arrival
    completed: bool  # this instance completed the series by its expected count
    superseded: str | None = None  # the file of the same SOP Instance UID at another path


def state_location(config: Any) -> Path | str:
    """Where a config keeps its state: ``state.url``, else the SQLite file under
    ``storage.data_dir``."""
    from aiworker.store.layout import DataPaths

    return config.state.url or DataPaths(config.storage.data_dir).db


class StateDB(SelectionTable, JobTable, WorkerTable):
    """Thread-safe access to the state DB: receiving, events, reconcile and reading here;
    selections (:class:`~aiworker.store.selections.SelectionTable`) and the job lifecycle
    (:class:`~aiworker.store.jobs.JobTable`) in their own modules."""

    def __init__(self, location: Path | str, busy_timeout_s: float = 10.0):
        """``location``: the SQLite file's path, or a ``postgresql://`` URL; on SQLite a write
        waits up to ``busy_timeout_s`` for another writer (``state.busy_timeout_s``)."""
        self.backend = open_backend(location, busy_timeout_s)
        self.location = self.backend.location
        self.path = self.location  # the SQLite file (a URL on PostgreSQL)
        self.handoff: NoHandoff = handoff_for(self.backend.kind)
        with self._transaction() as cur:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            _add_missing_columns(cur)
            self.handoff.create_schema(cur)

    @property
    def shared(self) -> bool:
        """Whether other processes share this state (PostgreSQL): stages then run as jobs."""
        return self.backend.kind == "postgresql"

    def close(self) -> None:
        self.backend.close()

    def _transaction(self) -> AbstractContextManager[Any]:
        return self.backend.transaction()

    def _query(self, sql: str, params: tuple = ()) -> list[Any]:
        return self.backend.query(sql, params)

    def transaction(self) -> AbstractContextManager[Any]:
        """One write transaction (committed at the end, rolled back on an error), for the
        store modules that keep tables of their own."""
        return self._transaction()

    def query(self, sql: str, params: tuple = ()) -> list[Any]:
        """The rows of one read."""
        return self._query(sql, params)

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
                write_event(cur, "series_started", rec.study_uid, rec.series_uid, rec.sop_uid,
                            calling_ae=rec.calling_ae, modality=rec.modality)
            if reopened:
                write_event(cur, "late_arrival", rec.study_uid, rec.series_uid, rec.sop_uid,
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
                write_event(cur, "study_completed", row["study_uid"], None, None)
                self.handoff.select(cur, row["study_uid"])
        return [row["series_uid"] for row in idle]

    def add_event(self, kind: str, study_uid: str | None = None, series_uid: str | None = None,
                  sop_uid: str | None = None, **detail: Any) -> None:
        """Record something that happened (an error, a rejection) for the dashboard and CLI."""
        with self._transaction() as cur:
            write_event(cur, kind, study_uid, series_uid, sop_uid, **detail)


    def series_instance_paths(self, series_uid: str) -> list[str]:
        """The paths of a series' stored instances, to load it as a volume."""
        rows = self._query("SELECT path FROM instances WHERE series_uid = ? AND state = ?"
                           " ORDER BY received_at, sop_uid", (series_uid, STORED))
        return [row["path"] for row in rows]


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
                write_event(cur, "instance_missing", row["study_uid"], row["series_uid"], sop_uid)
                touched.add(row["series_uid"])
            for series_uid in touched:
                _recount(cur, series_uid)

    # --- health ------------------------------------------------------------------------

    def probe_write(self) -> None:
        """Write and commit one row, to prove the DB takes writes (the readiness check);
        raises one of :data:`~aiworker.store.backend.STATE_ERRORS` when it cannot. The table
        ``health`` keeps that one row: when the last check ran."""
        with self._transaction() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY,"
                        " checked_at REAL NOT NULL)")
            cur.execute("INSERT INTO health (id, checked_at) VALUES (1, ?) ON CONFLICT (id)"
                        " DO UPDATE SET checked_at = excluded.checked_at", (time.time(),))

    # --- reading -----------------------------------------------------------------------

    def studies(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Every study (or only ``study_uid``), newest first, each with its series (in
        series-number order)."""
        where, params = ("", ()) if study_uid is None else (" WHERE study_uid = ?", (study_uid,))
        rows = self._query(f"SELECT * FROM studies{where} ORDER BY first_received DESC", params)
        studies = [dict(r) for r in rows]
        series = self._query(f"SELECT * FROM series{where} ORDER BY series_number,"
                             " first_received", params)
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

    def stored_instance(self, sop_uid: str) -> dict[str, Any] | None:
        """The stored instance of ``sop_uid`` (study_uid, series_uid, path), or None."""
        rows = self._query("SELECT study_uid, series_uid, path FROM instances"
                           " WHERE sop_uid = ? AND state = ?", (sop_uid, STORED))
        return dict(rows[0]) if rows else None

    def events(self, kinds: tuple[str, ...] = (), limit: int = 100) -> list[dict[str, Any]]:
        """The newest events first, optionally only those of the given kinds."""
        sql = "SELECT * FROM events"
        if kinds:
            sql += f" WHERE kind IN ({', '.join('?' * len(kinds))})"
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*kinds, limit))
        return [dict(r, detail=json.loads(r["detail"] or "{}")) for r in rows]


def _add_missing_columns(cur: Any) -> None:
    """Add to each table of :data:`ADDED_COLUMNS` the columns an older DB lacks."""
    for table, columns in ADDED_COLUMNS.items():
        cur.execute(f"SELECT * FROM {table} LIMIT 0")  # table names are constants
        present = {column[0] for column in cur.description}
        for name, definition in columns.items():
            if name not in present:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")


def _upsert_study(cur: Any, rec: InstanceRecord) -> None:
    cur.execute(
        "INSERT INTO studies (study_uid, patient_id, patient_name, accession_number, study_date,"
        " study_description, calling_ae, first_received, last_received, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (study_uid) DO UPDATE SET last_received = excluded.last_received,"
        " state = excluded.state, completed_at = NULL",
        (rec.study_uid, rec.patient_id, rec.patient_name, rec.accession_number, rec.study_date,
         rec.study_description, rec.calling_ae, rec.received_at, rec.received_at, RECEIVING),
    )


def _upsert_series(cur: Any, rec: InstanceRecord) -> None:
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


def _upsert_instance(cur: Any, rec: InstanceRecord) -> None:
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


def _recount(cur: Any, series_uid: str) -> tuple[int, int, int | None]:
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


def _complete_series(cur: Any, series_uid: str, study_uid: str, at: float,
                     rule: str, **detail: Any) -> None:
    cur.execute(
        "UPDATE series SET state = ?, closed_by = ?, completed_at = ? WHERE series_uid = ?",
        (COMPLETE, rule, at, series_uid),
    )
    write_event(cur, "series_completed", study_uid, series_uid, None, rule=rule, **detail)


