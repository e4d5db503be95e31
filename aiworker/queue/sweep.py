"""The sweep: every state that owes the next stage a job gets one, whatever happened
between the state change and its job (a crash, a job that failed its last attempt).

Owed: a complete study some pipeline has not decided (``select``), a queued job
(``infer``), a done job without outbox rows (``results``), a destination with due rows
(``outbox``). A key with a waiting or running procrastinate job is left alone; the others
are deferred in one transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiworker.store.handoff import defer, job_lock
from aiworker.store.outbox import Outbox


@dataclass(frozen=True)
class OwedJob:
    """A job the state owes: its queue, the id it carries, and (``infer``) its model."""

    queue: str
    ident: str
    model: str | None = None

    @property
    def lock(self) -> str:
        return job_lock(self.queue, self.ident)


def owed_jobs(outbox: Outbox, pipelines: list[str], now: float) -> list[OwedJob]:
    """Every job the state (the outbox's DB) owes, oldest first within each queue."""
    db = outbox.db
    owed = [OwedJob("select", uid) for uid, _, _ in db.awaiting_selection(pipelines)]
    owed += [OwedJob("infer", job.job_id, job.model) for job in db.queued_jobs()]
    owed += [OwedJob("results", job.job_id) for job in db.jobs_to_dispatch()]
    owed += [OwedJob("outbox", destination)
             for destination in outbox.due_destinations(now)]
    return owed


def sweep(outbox: Outbox, pipelines: list[str], now: float | None = None) -> list[str]:
    """Defer the owed jobs that have none waiting or running; returns their keys."""
    owed = owed_jobs(outbox, pipelines, time.time() if now is None else now)
    deferred = []
    with outbox.db.transaction() as cur:
        busy = {row["lock"] for row in cur.execute(
            "SELECT lock FROM procrastinate_jobs WHERE status IN ('todo', 'doing')").fetchall()}
        for job in owed:
            if job.lock not in busy:
                defer(cur, job.queue, job.ident, model=job.model)
                deferred.append(job.lock)
    return deferred
