"""The sweep: every state that owes the next stage a job gets one, whatever happened
between the state change and its job (a crash, a job that failed its last attempt).

Owed: a complete study some pipeline has not decided (``select``), a queued job
(``infer``), a done job without outbox rows (``results``), a destination with due rows
(``outbox``). A key with a waiting or running procrastinate job is left alone; the others
are deferred in one transaction.
"""

from __future__ import annotations

import time

from aiworker.store.db import StateDB
from aiworker.store.handoff import defer, job_lock
from aiworker.store.outbox import PENDING
from aiworker.store.states import QUEUED


def owed_jobs(db: StateDB, pipelines: list[str], now: float) -> list[tuple[str, str]]:
    """(queue, id) of every job the state owes, oldest first within each queue."""
    owed = [("select", uid) for uid, _, _ in db.awaiting_selection(pipelines)]
    owed += [("infer", row["job_id"]) for row in db.query(
        "SELECT job_id FROM jobs WHERE state = ? ORDER BY created_at", (QUEUED,))]
    owed += [("results", job["job_id"]) for job in db.jobs_to_dispatch()]
    owed += [("outbox", row["destination"]) for row in db.query(
        "SELECT DISTINCT destination FROM outbox WHERE state = ? AND next_attempt_at <= ?",
        (PENDING, now))]
    return owed


def sweep(db: StateDB, pipelines: list[str], now: float | None = None) -> list[str]:
    """Defer the owed jobs that have none waiting or running; returns their keys."""
    owed = owed_jobs(db, pipelines, time.time() if now is None else now)
    deferred = []
    with db.transaction() as cur:
        busy = {row["lock"] for row in cur.execute(
            "SELECT lock FROM procrastinate_jobs WHERE status IN ('todo', 'doing')").fetchall()}
        for queue, ident in owed:
            if job_lock(queue, ident) not in busy:
                defer(cur, queue, ident, {_ARG[queue]: ident})
                deferred.append(job_lock(queue, ident))
    return deferred


_ARG = {"select": "study_uid", "infer": "job_id", "results": "job_id",
        "outbox": "destination"}
