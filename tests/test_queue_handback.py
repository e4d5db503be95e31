"""Handing back the job of a killed worker (procrastinate's stalled-job retry), on a real
PostgreSQL: queued again when nothing else waits under its key; dropped when the key was
deferred again meanwhile (a retry would break the one-waiting-job-per-key rule, and the
stalled job's lock would keep the waiting one from ever starting)."""

from __future__ import annotations

import asyncio

import procrastinate

from aiworker.queue.worker import _hand_back
from aiworker.store.db import StateDB
from aiworker.store.handoff import defer


def _jobs(db: StateDB) -> list[tuple[int, str]]:
    return [(row["id"], row["status"]) for row in db.query(
        "SELECT id, status FROM procrastinate_jobs ORDER BY id")]


def _stall(db: StateDB) -> int:
    """Defer the RIS's outbox job and mark it running, as a worker killed mid-send left it."""
    with db.transaction() as cur:
        defer(cur, "outbox", "ris")
        [(job_id,)] = cur.execute("UPDATE procrastinate_jobs SET status = 'doing'"
                                  " RETURNING id").fetchall()
    return job_id


def _hand_back_by_id(url: str, job_id: int) -> None:
    async def run() -> None:
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        async with app.open_async():
            [job] = await app.job_manager.list_jobs_async(id=job_id)
            await _hand_back(app, job)
            await _hand_back(app, job)  # another worker's sweep, too late: nothing happens
    asyncio.run(run())


def test_a_stalled_job_is_queued_again(pg_url: str) -> None:
    db = StateDB(pg_url)
    try:
        stalled = _stall(db)
        _hand_back_by_id(pg_url, stalled)
        assert _jobs(db) == [(stalled, "todo")]
    finally:
        db.close()


def test_a_stalled_job_whose_key_waits_again_is_dropped(pg_url: str) -> None:
    db = StateDB(pg_url)
    try:
        stalled = _stall(db)
        with db.transaction() as cur:
            assert defer(cur, "outbox", "ris")  # new rows for the RIS meanwhile
        [(waiting, _)] = [job for job in _jobs(db) if job[0] != stalled]
        _hand_back_by_id(pg_url, stalled)
        assert _jobs(db) == [(waiting, "todo")]
    finally:
        db.close()
