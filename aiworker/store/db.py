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

Selection: ``selections`` keeps, per study and pipeline, the latest decision (its JSON
explanation) and the completion it answered (``completed_at``); a study that re-opens and
completes again lacks a decision for its new completion and is selected again. A match
adds a ``jobs`` row in state ``queued``; its ``job_key`` is derived from the study, the
chosen series and the model (:func:`job_key`), so selecting the same series for the same
model again finds the same job instead of adding one. A queued job that a newer decision
no longer wants becomes ``superseded``.

Inference jobs: a worker claims the oldest ``queued`` job, which becomes ``running`` (one
more ``attempts``) in one statement, and ends it ``done`` (findings, timings per step,
device, result folder) or ``failed`` (the error, its kind - ``data``, ``model`` or
``resource`` - and the timings so far). A job still ``running`` when the node starts was cut
off by a crash and is queued again (:meth:`StateDB.requeue_running`); an operator re-queues a
failed one (:meth:`StateDB.retry_job`). Each change adds an event (``job_started``,
``job_done``, ``job_failed``, ``job_requeued``, ``job_retried``).

An older DB opens as well: columns added since it was made are added to it at start.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
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
CREATE TABLE IF NOT EXISTS selections (
    study_uid    TEXT NOT NULL,
    pipeline     TEXT NOT NULL,
    completed_at REAL NOT NULL,
    decided_at   REAL NOT NULL,
    matched      INTEGER NOT NULL,
    explanation  TEXT NOT NULL,
    PRIMARY KEY (study_uid, pipeline)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id     TEXT PRIMARY KEY,
    job_key    TEXT NOT NULL UNIQUE,
    pipeline   TEXT NOT NULL,
    model      TEXT NOT NULL,
    study_uid  TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    inputs     TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    device      TEXT,
    timings     TEXT,
    findings    TEXT,
    error       TEXT,
    error_kind  TEXT,
    result_dir  TEXT,
    dispatched_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
"""

# Events an operator must see: something was refused, lost, repaired or failed.
PROBLEM_EVENTS = ("store_failed", "association_rejected", "instance_missing", "quarantined",
                  "reconcile", "job_failed")

# Columns added to a table after its first release: an older DB gets them at start.
ADDED_COLUMNS = {
    "jobs": {"started_at": "REAL", "finished_at": "REAL",
             "attempts": "INTEGER NOT NULL DEFAULT 0", "device": "TEXT", "timings": "TEXT",
             "findings": "TEXT", "error": "TEXT", "error_kind": "TEXT", "result_dir": "TEXT",
             "dispatched_at": "REAL"},
}

RECEIVING = "receiving"
COMPLETE = "complete"
STORED = "stored"
MISSING = "missing"
QUEUED = "queued"
SUPERSEDED = "superseded"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
ERROR_KINDS = ("data", "model", "resource")


class JobError(Exception):
    """A job reference that names no job, several jobs, or a job in the wrong state."""


def job_key(study_uid: str, inputs: dict[str, str], model: str) -> str:
    """The identity of a job: the same study, series (by role) and model give the same key,
    and every result the job produces derives its UIDs from it."""
    roles = ",".join(f"{role}={uid}" for role, uid in sorted(inputs.items()))
    return hashlib.sha256(f"{study_uid}|{roles}|{model}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class NewJob:
    """A job a selection asks for: run ``model`` of ``pipeline`` on the chosen series."""

    pipeline: str
    model: str
    study_uid: str
    inputs: dict[str, str]  # role -> series UID

    @property
    def key(self) -> str:
        return job_key(self.study_uid, self.inputs, self.model)

    @property
    def series_uid(self) -> str:
        """The series of the first role: the one a job is listed under."""
        return next(iter(self.inputs.values()))


@dataclass(frozen=True)
class SelectionRecord:
    """What recording a decision did."""

    job_id: str | None  # the job of a match (new or already there)
    job_created: bool  # False when the same job_key was queued before (a re-selection)
    superseded: list[str]  # queued jobs of the study and pipeline no longer wanted


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
            _add_missing_columns(cur)

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

    def transaction(self) -> AbstractContextManager[sqlite3.Cursor]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on an error), for
        the store modules that keep tables of their own."""
        return self._transaction()

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
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

    # --- selection ---------------------------------------------------------------------

    def awaiting_selection(self, pipelines: list[str]) -> list[tuple[str, float, list[str]]]:
        """Complete studies that lack a decision of some pipeline for their latest
        completion: (study UID, completed_at, the pipelines that owe one), oldest first."""
        waiting: dict[str, tuple[float, list[str]]] = {}
        for pipeline in pipelines:
            rows = self._query(
                "SELECT study_uid, completed_at FROM studies s WHERE state = ?"
                " AND NOT EXISTS (SELECT 1 FROM selections x WHERE x.study_uid = s.study_uid"
                " AND x.pipeline = ? AND x.completed_at = s.completed_at)"
                " ORDER BY completed_at", (COMPLETE, pipeline))
            for row in rows:
                waiting.setdefault(row["study_uid"], (row["completed_at"], []))[1].append(pipeline)
        return sorted(((uid, at, names) for uid, (at, names) in waiting.items()),
                      key=lambda item: item[1])

    def study_instance_paths(self, study_uid: str) -> dict[str, list[str]]:
        """Series UID -> the paths of its stored instances, for a study."""
        rows = self._query("SELECT series_uid, path FROM instances WHERE study_uid = ?"
                           " AND state = ? ORDER BY series_uid, received_at", (study_uid, STORED))
        paths: dict[str, list[str]] = {}
        for row in rows:
            paths.setdefault(row["series_uid"], []).append(row["path"])
        return paths

    def record_selection(self, study_uid: str, completed_at: float, pipeline: str,
                         explanation: dict[str, Any], job: NewJob | None
                         ) -> SelectionRecord | None:
        """Keep a pipeline's decision on a study and, for a match, its queued job.

        Nothing is written (None is returned) when the study is no longer complete with the
        completion the decision answered: an instance arrived meanwhile, and the study will
        be selected again once it completes again.
        """
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute("SELECT state, completed_at FROM studies WHERE study_uid = ?",
                              (study_uid,)).fetchone()
            if row is None or row["state"] != COMPLETE or row["completed_at"] != completed_at:
                return None
            cur.execute(
                "INSERT INTO selections (study_uid, pipeline, completed_at, decided_at, matched,"
                " explanation) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (study_uid, pipeline) DO UPDATE SET"
                " completed_at = excluded.completed_at, decided_at = excluded.decided_at,"
                " matched = excluded.matched, explanation = excluded.explanation",
                (study_uid, pipeline, completed_at, now, int(job is not None),
                 json.dumps(explanation)),
            )
            job_id, created = _queue_job(cur, job, now) if job else (None, False)
            superseded = [r["job_id"] for r in cur.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE study_uid = ? AND pipeline = ?"
                " AND state = ? AND job_key <> ? RETURNING job_id",
                (SUPERSEDED, now, study_uid, pipeline, QUEUED, job.key if job else ""),
            ).fetchall()]
            if job:
                _event(cur, "selected", study_uid, job.series_uid, None, pipeline=pipeline,
                       job_id=job_id, job_created=created, chosen=job.inputs,
                       superseded=superseded)
            else:
                _event(cur, "not_selected", study_uid, None, None, pipeline=pipeline,
                       reason=explanation.get("reason"), superseded=superseded)
        return SelectionRecord(job_id, created, superseded)

    def selections(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Every stored decision (only one study's when ``study_uid`` is given), its
        explanation parsed."""
        sql, params = "SELECT * FROM selections", ()
        if study_uid is not None:
            sql, params = sql + " WHERE study_uid = ?", (study_uid,)
        rows = self._query(sql + " ORDER BY study_uid, pipeline", params)
        return [dict(r, matched=bool(r["matched"]), explanation=json.loads(r["explanation"]))
                for r in rows]

    def jobs(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Jobs, oldest first; only one study's when ``study_uid`` is given."""
        sql, params = "SELECT * FROM jobs", ()
        if study_uid is not None:
            sql, params = sql + " WHERE study_uid = ?", (study_uid,)
        rows = self._query(sql + " ORDER BY created_at, job_id", params)
        return [_job(r) for r in rows]

    # --- inference jobs ----------------------------------------------------------------

    def series_instance_paths(self, series_uid: str) -> list[str]:
        """The paths of a series' stored instances, to load it as a volume."""
        rows = self._query("SELECT path FROM instances WHERE series_uid = ? AND state = ?"
                           " ORDER BY received_at, sop_uid", (series_uid, STORED))
        return [row["path"] for row in rows]

    def jobs_to_dispatch(self) -> list[dict[str, Any]]:
        """Done jobs with a result folder that the outbox stage has not handed on yet (no
        outbox row, not marked by :meth:`mark_dispatched`), oldest first."""
        rows = self._query(
            "SELECT * FROM jobs j WHERE state = ? AND result_dir IS NOT NULL"
            " AND dispatched_at IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.job_id)"
            " ORDER BY finished_at, job_id", (DONE,))
        return [_job(r) for r in rows]

    def mark_dispatched(self, job_id: str, now: float | None = None) -> None:
        """The outbox stage has queued the job's rows, or found it sends nowhere: until
        then retention must not take the study for delivered."""
        with self._transaction() as cur:
            cur.execute("UPDATE jobs SET dispatched_at = ? WHERE job_id = ?",
                        (time.time() if now is None else now, job_id))

    def has_queued_job(self) -> bool:
        """Whether a job waits (a read, cheaper than :meth:`claim_job`'s write lock)."""
        return bool(self._query("SELECT 1 FROM jobs WHERE state = ? LIMIT 1", (QUEUED,)))

    def claim_job(self) -> dict[str, Any] | None:
        """Take the oldest queued job: it becomes ``running`` with one more attempt in a
        single statement, so two workers never take the same job. None when none waits."""
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute(
                "UPDATE jobs SET state = ?, started_at = ?, updated_at = ?, finished_at = NULL,"
                " attempts = attempts + 1 WHERE state = ? AND job_id = (SELECT job_id FROM jobs"
                " WHERE state = ? ORDER BY created_at, job_id LIMIT 1) RETURNING *",
                (RUNNING, now, now, QUEUED, QUEUED),
            ).fetchone()
            if row is not None:
                _event(cur, "job_started", row["study_uid"], row["series_uid"], None,
                       job_id=row["job_id"], model=row["model"], attempt=row["attempts"])
        return None if row is None else _job(row)

    def finish_job(self, job_id: str, findings: dict[str, Any], timings: dict[str, float],
                   device: str, result_dir: str) -> bool:
        """A running job is ``done``; False when it was not running (nothing changes)."""
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?, findings = ?,"
                " timings = ?, device = ?, result_dir = ?, error = NULL, error_kind = NULL"
                " WHERE job_id = ? AND state = ? RETURNING study_uid, series_uid, model",
                (DONE, now, now, json.dumps(findings), json.dumps(timings), device, result_dir,
                 job_id, RUNNING),
            ).fetchone()
            if row is not None:
                _event(cur, "job_done", row["study_uid"], row["series_uid"], None,
                       job_id=job_id, model=row["model"], device=device, timings=timings)
        return row is not None

    def fail_job(self, job_id: str, error: str, kind: str, timings: dict[str, float],
                 device: str | None = None) -> bool:
        """A running job is ``failed`` with its error, the error's kind (one of
        :data:`ERROR_KINDS`) and the timings of the steps it finished; False when it was
        not running."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {', '.join(ERROR_KINDS)}, not {kind!r}")
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?, error = ?,"
                " error_kind = ?, timings = ?, device = ? WHERE job_id = ? AND state = ?"
                " RETURNING study_uid, series_uid, model",
                (FAILED, now, now, error, kind, json.dumps(timings), device, job_id, RUNNING),
            ).fetchone()
            if row is not None:
                _event(cur, "job_failed", row["study_uid"], row["series_uid"], None,
                       job_id=job_id, model=row["model"], error_kind=kind,
                       reason=f"{kind} error: {error}")
        return row is not None

    def failed_job_ids(self, kind: str, error_prefix: str) -> list[str]:
        """The failed jobs of an error kind whose error begins with ``error_prefix``, oldest
        first (the infer stage retries those a full disk stopped)."""
        rows = self._query("SELECT job_id FROM jobs WHERE state = ? AND error_kind = ? AND"
                           " SUBSTR(error, 1, ?) = ? ORDER BY created_at, job_id",
                           (FAILED, kind, len(error_prefix), error_prefix))
        return [row["job_id"] for row in rows]

    def requeue_running(self, reason: str = "restart") -> list[str]:
        """Queue again every ``running`` job (its run was cut off: a crash, or the node
        stopping mid-job); returns their ids."""
        now = time.time()
        with self._transaction() as cur:
            rows = cur.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?"
                " RETURNING job_id, study_uid, series_uid, model", (QUEUED, now, RUNNING),
            ).fetchall()
            for row in rows:
                _event(cur, "job_requeued", row["study_uid"], row["series_uid"], None,
                       job_id=row["job_id"], model=row["model"], reason=reason)
        return [row["job_id"] for row in rows]

    def retry_job(self, ref: str) -> dict[str, Any]:
        """Queue a failed job again; ``ref`` is its job_id or a prefix of its job_id or
        job_key. Returns the job as it was before. Raises :class:`JobError` when ``ref``
        names no job, several jobs, or a job that is not ``failed``."""
        ref = ref.strip()
        if not ref:
            raise JobError("give a job id (or its first characters)")
        now = time.time()
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT * FROM jobs WHERE SUBSTR(job_id, 1, ?) = ? OR SUBSTR(job_key, 1, ?) = ?"
                " ORDER BY created_at, job_id", (len(ref), ref, len(ref), ref),
            ).fetchall()
            job = _only_job(ref, rows)
            if job["state"] != FAILED:
                raise JobError(f"job {job['job_id']} is {job['state']}, not failed: only a "
                               "failed job can be retried")
            cur.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, finished_at = NULL, error = NULL,"
                " error_kind = NULL, findings = NULL, device = NULL, result_dir = NULL"
                " WHERE job_id = ?", (QUEUED, now, job["job_id"]))
            _event(cur, "job_retried", job["study_uid"], job["series_uid"], None,
                   job_id=job["job_id"], model=job["model"], error_kind=job["error_kind"],
                   error=job["error"], attempts=job["attempts"])
        return job

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

    # --- health ------------------------------------------------------------------------

    def probe_write(self) -> None:
        """Write and commit one row, to prove the DB takes writes (the readiness check);
        raises :class:`sqlite3.Error` when it cannot. The table ``health`` keeps that one
        row: when the last check ran."""
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


def _add_missing_columns(cur: sqlite3.Cursor) -> None:
    """Add to each table of :data:`ADDED_COLUMNS` the columns an older DB lacks."""
    for table, columns in ADDED_COLUMNS.items():
        cur.execute(f"SELECT * FROM {table} LIMIT 0")  # table names are constants
        present = {column[0] for column in cur.description}
        for name, definition in columns.items():
            if name not in present:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")


def _job(row: sqlite3.Row) -> dict[str, Any]:
    """A jobs row as a dict, its JSON columns parsed."""
    job = dict(row)
    job["inputs"] = json.loads(job["inputs"])
    for column in ("timings", "findings"):
        job[column] = json.loads(job[column]) if job.get(column) else None
    return job


def _only_job(ref: str, rows: list[sqlite3.Row]) -> dict[str, Any]:
    """The one job ``ref`` names: an exact job_id wins over prefixes."""
    exact = [row for row in rows if row["job_id"] == ref]
    if exact or len(rows) == 1:
        return _job((exact or rows)[0])
    if not rows:
        raise JobError(f"no job {ref!r}: see `aiworker status` for job ids")
    shown = ", ".join(row["job_id"] for row in rows[:5])
    raise JobError(f"{ref!r} names {len(rows)} jobs ({shown}): give more of the id")


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


def _queue_job(cur: sqlite3.Cursor, job: NewJob, now: float) -> tuple[str, bool]:
    """Queue ``job`` unless its key is there; a superseded job wanted again is re-queued.
    Returns (job_id, whether a row was added)."""
    added = cur.execute(
        "INSERT INTO jobs (job_id, job_key, pipeline, model, study_uid, series_uid, inputs,"
        " state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_key) DO NOTHING RETURNING job_id",
        (uuid.uuid4().hex, job.key, job.pipeline, job.model, job.study_uid, job.series_uid,
         json.dumps(job.inputs), QUEUED, now, now),
    ).fetchone()
    if added is not None:
        return added["job_id"], True
    (job_id,) = cur.execute(
        "UPDATE jobs SET state = ?, updated_at = ? WHERE job_key = ? AND state = ?"
        " RETURNING job_id", (QUEUED, now, job.key, SUPERSEDED),
    ).fetchone() or cur.execute("SELECT job_id FROM jobs WHERE job_key = ?",
                                (job.key,)).fetchone()
    return job_id, False


def _event(cur: sqlite3.Cursor, kind: str, study_uid: str | None, series_uid: str | None,
           sop_uid: str | None, **detail: Any) -> None:
    cur.execute(
        "INSERT INTO events (at, kind, study_uid, series_uid, sop_uid, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), kind, study_uid, series_uid, sop_uid, json.dumps(detail) if detail else None),
    )
