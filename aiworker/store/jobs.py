"""The job lifecycle in the state DB, mixed into :class:`~aiworker.store.db.StateDB`.

A match of a selection adds a ``jobs`` row in state ``queued`` (:func:`queue_job`); its
``job_key`` is derived from the study, the chosen series and the model (:func:`job_key`), so
selecting the same series for the same model again finds the same job instead of adding one.
A worker claims the oldest ``queued`` job, which becomes ``running`` (one more ``attempts``)
in one statement, and ends it ``done`` (findings, timings per step, device, result folder)
or ``failed`` (the error, its kind - ``data``, ``model`` or ``resource`` - and the timings so
far). A job still ``running`` when the node starts was cut off by a crash and is queued again
(:meth:`JobTable.requeue_running`); an operator re-queues a failed one
(:meth:`JobTable.retry_job`). The outbox stage marks a done job ``dispatched`` once it has
queued its rows (or found it sends nowhere), which retention waits for. Each change adds an
event (``job_started``, ``job_done``, ``job_failed``, ``job_requeued``, ``job_retried``).
Every method that returns a job returns a :class:`Job`, its JSON columns decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from aiworker.store.events import write_event
from aiworker.store.handoff import NoHandoff
from aiworker.store.states import DONE, ERROR_KINDS, FAILED, QUEUED, RUNNING, SUPERSEDED


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
class Job:
    """One ``jobs`` row as the stages hand it on: every column, the JSON ones decoded
    (``inputs`` role -> series UID; ``timings`` and ``findings`` None until recorded;
    ``warnings`` the header warnings its result objects recorded, empty until done)."""

    job_id: str
    job_key: str
    pipeline: str
    model: str
    study_uid: str
    series_uid: str  # the series of the first role: the one a job is listed under
    inputs: dict[str, str]
    state: str  # one of aiworker.store.states' job states
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    device: str | None
    timings: dict[str, float] | None
    findings: dict[str, Any] | None
    error: str | None
    error_kind: str | None  # one of ERROR_KINDS when failed
    result_dir: str | None
    dispatched_at: float | None
    warnings: list[dict[str, Any]]
    worker: str | None  # host:pid of the process that ran it last

    @classmethod
    def from_row(cls, row: Any) -> Job:
        """A ``SELECT *`` (or ``RETURNING *``) row of ``jobs``, on SQLite or PostgreSQL."""
        data = dict(row)
        return cls(
            job_id=data["job_id"], job_key=data["job_key"], pipeline=data["pipeline"],
            model=data["model"], study_uid=data["study_uid"], series_uid=data["series_uid"],
            inputs=json.loads(data["inputs"]), state=data["state"],
            created_at=data["created_at"], updated_at=data["updated_at"],
            started_at=data.get("started_at"), finished_at=data.get("finished_at"),
            attempts=data.get("attempts") or 0, device=data.get("device"),
            timings=_json_or_none(data.get("timings")),
            findings=_json_or_none(data.get("findings")),
            error=data.get("error"), error_kind=data.get("error_kind"),
            result_dir=data.get("result_dir"), dispatched_at=data.get("dispatched_at"),
            warnings=_json_or_none(data.get("warnings")) or [], worker=data.get("worker"))


def _json_or_none(text: str | None) -> Any:
    """A JSON column's value; None for NULL (or an empty text)."""
    return json.loads(text) if text else None


# the jobs a reference names: a prefix of the job_id or of the job_key
_BY_REF = ("SELECT * FROM jobs WHERE SUBSTR(job_id, 1, ?) = ? OR SUBSTR(job_key, 1, ?) = ?"
           " ORDER BY created_at, job_id")


class JobTable:
    """The job methods of the state DB (which gives the transaction and the query)."""

    _transaction: Callable[[], AbstractContextManager[Any]]
    _query: Callable[..., list[Any]]
    handoff: NoHandoff

    def jobs(self, study_uid: str | None = None) -> list[Job]:
        """Jobs, oldest first; only one study's when ``study_uid`` is given."""
        sql, params = "SELECT * FROM jobs", ()
        if study_uid is not None:
            sql, params = sql + " WHERE study_uid = ?", (study_uid,)
        rows = self._query(sql + " ORDER BY created_at, job_id", params)
        return [Job.from_row(r) for r in rows]

    def queued_jobs(self) -> list[Job]:
        """The jobs waiting to run, oldest first."""
        rows = self._query("SELECT * FROM jobs WHERE state = ? ORDER BY created_at, job_id",
                           (QUEUED,))
        return [Job.from_row(r) for r in rows]

    def jobs_to_dispatch(self, job_id: str | None = None) -> list[Job]:
        """Done jobs (or only ``job_id``) with a result folder that the outbox stage has not
        handed on yet (no outbox row, not marked by :meth:`mark_dispatched`), oldest
        first."""
        only = "" if job_id is None else " AND job_id = ?"
        rows = self._query(
            "SELECT * FROM jobs j WHERE state = ? AND result_dir IS NOT NULL" + only +
            " AND dispatched_at IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.job_id)"
            " ORDER BY finished_at, job_id", (DONE, *(() if job_id is None else (job_id,))))
        return [Job.from_row(r) for r in rows]

    def mark_dispatched(self, job_id: str, now: float | None = None) -> None:
        """The outbox stage has queued the job's rows, or found it sends nowhere: until
        then retention must not take the study for delivered."""
        with self._transaction() as cur:
            cur.execute("UPDATE jobs SET dispatched_at = ? WHERE job_id = ?",
                        (time.time() if now is None else now, job_id))

    def has_queued_job(self) -> bool:
        """Whether a job waits (a read, cheaper than :meth:`claim_job`'s write lock)."""
        return bool(self._query("SELECT 1 FROM jobs WHERE state = ? LIMIT 1", (QUEUED,)))

    def claim_job(self, worker: str | None = None) -> Job | None:
        """Take the oldest queued job: it becomes ``running`` with one more attempt in a
        single statement, so two workers never take the same job; ``worker`` (this process,
        by default) is recorded as the one running it. None when none waits."""
        return self._claim("state = ? AND job_id = (SELECT job_id FROM jobs WHERE state = ?"
                           " ORDER BY created_at, job_id LIMIT 1)", (QUEUED, QUEUED), worker)

    def claim_job_id(self, job_id: str, worker: str | None = None) -> Job | None:
        """Take one job for an ``infer`` queue job: when queued, or when ``running`` (its
        queue job is the only one of that job that runs - procrastinate's lock - so a running
        row is one whose worker was killed). None when it is done, failed or superseded."""
        return self._claim("job_id = ? AND state IN (?, ?)", (job_id, QUEUED, RUNNING), worker)

    def _claim(self, where: str, params: tuple, worker: str | None) -> Job | None:
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute(
                "UPDATE jobs SET state = ?, started_at = ?, updated_at = ?, finished_at = NULL,"
                f" attempts = attempts + 1, worker = ? WHERE {where} RETURNING *",
                (RUNNING, now, now, worker or worker_name(), *params),
            ).fetchone()
            if row is not None:
                write_event(cur, "job_started", row["study_uid"], row["series_uid"], None,
                            job_id=row["job_id"], model=row["model"], attempt=row["attempts"],
                            worker=row["worker"])
        return None if row is None else Job.from_row(row)

    def finish_job(self, job_id: str, findings: dict[str, Any], timings: dict[str, float],
                   device: str, result_dir: str,
                   warnings: list[dict[str, Any]] | None = None) -> bool:
        """A running job is ``done``, with the header ``warnings`` its result objects
        recorded; False when it was not running (nothing changes)."""
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?, findings = ?,"
                " timings = ?, device = ?, result_dir = ?, warnings = ?, error = NULL,"
                " error_kind = NULL"
                " WHERE job_id = ? AND state = ? RETURNING study_uid, series_uid, model",
                (DONE, now, now, json.dumps(findings), json.dumps(timings), device, result_dir,
                 json.dumps(warnings or []), job_id, RUNNING),
            ).fetchone()
            if row is not None:
                self.handoff.results(cur, job_id)
                write_event(cur, "job_done", row["study_uid"], row["series_uid"], None,
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
                write_event(cur, "job_failed", row["study_uid"], row["series_uid"], None,
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

    def requeue_running(self, reason: str = "restart", worker: str | None = None) -> list[str]:
        """Queue again every ``running`` job (its run was cut off: a crash, or the node
        stopping mid-job), or only those ``worker`` runs; returns their ids."""
        now = time.time()
        where, params = ("", ()) if worker is None else (" AND worker = ?", (worker,))
        with self._transaction() as cur:
            rows = cur.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?" + where
                + " RETURNING job_id, study_uid, series_uid, model", (QUEUED, now, RUNNING,
                                                                    *params),
            ).fetchall()
            for row in rows:
                self.handoff.infer(cur, row["job_id"], row["model"])
                write_event(cur, "job_requeued", row["study_uid"], row["series_uid"], None,
                            job_id=row["job_id"], model=row["model"], reason=reason)
        return [row["job_id"] for row in rows]

    def find_job(self, ref: str) -> Job:
        """The one job ``ref`` names: its job_id, or a prefix of its job_id or job_key.
        Raises :class:`JobError` when it names none or several."""
        ref = ref.strip()
        if not ref:
            raise JobError("give a job id (or its first characters)")
        return _only_job(ref, self._query(_BY_REF, (len(ref), ref, len(ref), ref)))

    def retry_job(self, ref: str) -> Job:
        """Queue a failed job again; ``ref`` is its job_id or a prefix of its job_id or
        job_key. Returns the job as it was before. Raises :class:`JobError` when ``ref``
        names no job, several jobs, or a job that is not ``failed``."""
        ref = ref.strip()
        if not ref:
            raise JobError("give a job id (or its first characters)")
        now = time.time()
        with self._transaction() as cur:
            rows = cur.execute(_BY_REF, (len(ref), ref, len(ref), ref)).fetchall()
            job = _only_job(ref, rows)
            if job.state != FAILED:
                raise JobError(f"job {job.job_id} is {job.state}, not failed: only a "
                               "failed job can be retried")
            cur.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, finished_at = NULL, error = NULL,"
                " error_kind = NULL, findings = NULL, device = NULL, result_dir = NULL"
                " WHERE job_id = ?", (QUEUED, now, job.job_id))
            self.handoff.infer(cur, job.job_id, job.model)
            write_event(cur, "job_retried", job.study_uid, job.series_uid, None,
                        job_id=job.job_id, model=job.model, error_kind=job.error_kind,
                        error=job.error, attempts=job.attempts)
        return job


def worker_name() -> str:
    """This process, as jobs record who ran them: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _only_job(ref: str, rows: list[Any]) -> Job:
    """The one job ``ref`` names: an exact job_id wins over prefixes."""
    exact = [row for row in rows if row["job_id"] == ref]
    if exact or len(rows) == 1:
        return Job.from_row((exact or rows)[0])
    if not rows:
        raise JobError(f"no job {ref!r}: see `aiworker status` for job ids")
    shown = ", ".join(row["job_id"] for row in rows[:5])
    raise JobError(f"{ref!r} names {len(rows)} jobs ({shown}): give more of the id")


def queue_job(cur: Any, job: NewJob, now: float) -> tuple[str, bool]:
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
