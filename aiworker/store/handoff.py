"""Hand-offs between stages: the job a state change owes the next stage.

On PostgreSQL the stages run as procrastinate jobs (:mod:`aiworker.queue`). A state change
defers the job that follows it **in the same transaction** (:class:`QueueHandoff`): a study
that completes defers its ``select`` job, a queued job its ``infer`` job, a done job its
``results`` job, new or retried outbox rows their destination's ``outbox`` job. Either both
commit or neither does; a sweep (:mod:`aiworker.queue.sweep`) re-defers any state that lacks
its job all the same.

Each job carries ids, never pixels (:data:`JOB_ARGS`), and has a key (``select:<study>``,
``infer:<job id>``, ``results:<job id>``, ``outbox:<destination>``) that is both
procrastinate's queueing lock (one waiting job per key: deferring again adds nothing, or
moves a later start earlier) and its lock (one running job per key). Every stage's work is
idempotent, so a job that runs twice (a worker killed mid-job, retried elsewhere) changes
nothing the first run did.

An ``infer`` job waits in its model's queue (:func:`infer_queue`, ``infer/knee-demo``), so
only a worker that holds the model takes it.

On SQLite the stages poll the tables and :class:`NoHandoff` does nothing.
"""

from __future__ import annotations

import json
from typing import Any

QUEUES = ("select", "infer", "results", "outbox")
TASKS = {queue: f"aiworker.{queue}" for queue in QUEUES}  # queue -> procrastinate task name
JOB_ARGS = {"select": "study_uid", "infer": "job_id", "results": "job_id",
            "outbox": "destination"}  # queue -> the name of the one id its job carries


def infer_queue(model: str) -> str:
    """The procrastinate queue of ``model``'s ``infer`` jobs."""
    return f"infer/{model}"


def job_lock(queue: str, ident: str) -> str:
    """The queueing lock and lock of the ``queue`` job for ``ident``."""
    return f"{queue}:{ident}"


class NoHandoff:
    """SQLite: the stages poll, nothing is deferred."""

    def create_schema(self, cur: Any) -> None:
        """Nothing to create."""

    def select(self, cur: Any, study_uid: str) -> None:
        """The study's selection is found by the select stage's poll."""

    def infer(self, cur: Any, job_id: str, model: str) -> None:
        """The queued job is claimed by the infer stage's poll."""

    def results(self, cur: Any, job_id: str) -> None:
        """The done job is found by the outbox stage's poll."""

    def outbox(self, cur: Any, destination: str, at: float | None = None) -> None:
        """Due rows are found by the outbox stage's poll."""


class QueueHandoff(NoHandoff):
    """PostgreSQL: each hand-off is a procrastinate job, deferred in the caller's
    transaction."""

    def create_schema(self, cur: Any) -> None:
        """procrastinate's tables and functions, when the database lacks them."""
        from procrastinate.schema import SchemaManager  # PostgreSQL only: SQLite never loads it

        if cur.execute("SELECT to_regclass('procrastinate_jobs') AS t").fetchone()["t"]:
            return
        cur.execute_script(SchemaManager.get_schema())

    def select(self, cur: Any, study_uid: str) -> None:
        defer(cur, "select", study_uid)

    def infer(self, cur: Any, job_id: str, model: str) -> None:
        defer(cur, "infer", job_id, model=model)

    def results(self, cur: Any, job_id: str) -> None:
        defer(cur, "results", job_id)

    def outbox(self, cur: Any, destination: str, at: float | None = None) -> None:
        defer(cur, "outbox", destination, at)


def defer(cur: Any, queue: str, ident: str, at: float | None = None,
          model: str | None = None) -> bool:
    """Defer the ``queue`` job for ``ident`` (to start at ``at``, epoch seconds, or now;
    an ``infer`` job in ``model``'s queue) unless one waits already, which then starts at
    the earlier of the two times. Returns whether a job was added. The caller's transaction
    holds the state's write lock, so two deferrals of one key cannot race."""
    lock = job_lock(queue, ident)
    moved = cur.execute(
        "UPDATE procrastinate_jobs SET scheduled_at = CASE WHEN scheduled_at IS NULL"
        " OR ?::float8 IS NULL THEN NULL ELSE LEAST(scheduled_at, to_timestamp(?::float8)) END"
        " WHERE queueing_lock = ? AND status = 'todo' RETURNING id", (at, at, lock)).fetchall()
    if moved:
        return False
    cur.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args,"
        " scheduled_at) VALUES (?, ?, ?, ?, ?::jsonb, to_timestamp(?::float8))",
        (infer_queue(model or "") if queue == "infer" else queue, TASKS[queue], lock, lock,
         json.dumps({JOB_ARGS[queue]: ident}), at))
    return True


def handoff_for(kind: str) -> NoHandoff:
    """The hand-off of a backend kind (``sqlite`` or ``postgresql``)."""
    return QueueHandoff() if kind == "postgresql" else NoHandoff()
