"""A worker of stage jobs on a shared PostgreSQL state (``aiworker worker``, and the job
side of ``aiworker serve`` on PostgreSQL).

:class:`QueueWorker` runs, in a thread with its own event loop, one procrastinate worker for
the ``infer`` queues of the models it holds (one job at a time, the models resident in the
inference process, loaded at start; a job for a model it lacks is left to a worker that
holds it) and one for the other queues it serves (:data:`STAGE_CONCURRENCY` at a
time), plus the sweep (:mod:`aiworker.queue.sweep`) every :data:`SWEEP_S` seconds.

A worker killed mid-job (``kill -9``, a lost node) stops sending heartbeats; after
:data:`STALLED_S` seconds without one, any other worker's sweep hands its running jobs back
to the queue (procrastinate's stalled-job retry), so another worker runs them within about
``STALLED_S + SWEEP_S`` seconds (15 s). Every stage's work is idempotent and every result
UID and HL7 control id comes from the job key, so the rerun sends the same objects.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import procrastinate
from procrastinate.exceptions import ConnectorException, UniqueViolation
from procrastinate.jobs import Job, Status

from aiworker.config import Config
from aiworker.queue.runners import StageRunners
from aiworker.queue.sweep import sweep
from aiworker.queue.tasks import build_app
from aiworker.select.decide import configured_pipelines
from aiworker.store.db import StateDB
from aiworker.store.handoff import QUEUES, infer_queue
from aiworker.store.jobs import worker_name
from aiworker.store.outbox import Outbox

log = logging.getLogger("aiworker.queue")

HEARTBEAT_S = 2.0  # procrastinate worker heartbeat
STALLED_S = 10.0  # a worker without a heartbeat for this long was killed
SWEEP_S = 5.0
STAGE_CONCURRENCY = 2


def parse_queues(text: str | None) -> list[str]:
    """``--queues`` as a list (every queue when not given); raises ValueError naming an
    unknown queue."""
    queues = [q.strip() for q in (text or ",".join(QUEUES)).split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise ValueError(f"unknown queue {', '.join(unknown) or '(none)'}: use "
                         f"{','.join(QUEUES)}")
    return queues


class QueueWorker:
    """Runs the jobs of ``queues`` from the shared state until :meth:`stop`."""

    def __init__(self, config: Config, db: StateDB, queues: list[str]):
        self.config = config
        self.db = db
        self.queues = queues
        self.name = worker_name()
        self.runners = StageRunners.build(config, db, queues)
        self.pipelines = [p.name for p in configured_pipelines(config)]
        self.outbox = Outbox(db)  # its table, which the sweep reads, exists from the start
        self.infer_thread = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self.stage_threads = ThreadPoolExecutor(STAGE_CONCURRENCY + 1,
                                                thread_name_prefix="stage")
        self.started_at = time.time()
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="queue-worker", daemon=True)

    @property
    def inferrer(self):
        return self.runners.inferrer

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop taking jobs, let the running ones end (an inference is cut off and its job
        queued again), stop the inference process and leave the workers table."""
        self.runners.stop()
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=60)

    def readiness(self) -> tuple[bool, str]:
        """The models (on an ``infer`` worker) and whether the worker takes jobs."""
        if self.runners.inferrer is not None:
            ok, text = self.runners.inferrer.readiness()
            return ok and self.ready.is_set(), text
        return self.ready.is_set(), f"worker for {','.join(self.queues)}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("queue worker %s stopped on an error", self.name)
        finally:
            if self.runners.inferrer is not None:
                self.infer_thread.submit(self.runners.inferrer.finished).result()
                self.runners.inferrer.requeue_own()
            self.db.worker_gone(self.name)
            self.infer_thread.shutdown()
            self.stage_threads.shutdown()

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        app = build_app(self.config.state.url or "", self.runners, self.infer_thread,
                        self.stage_threads)
        async with app.open_async():
            if self.runners.inferrer is not None:
                await self._loop.run_in_executor(self.infer_thread,
                                                 self.runners.inferrer.load_models)
            self._announce()
            options = {"name": self.name, "install_signal_handlers": False, "wait": True,
                       "listen_notify": True, "update_heartbeat_interval": HEARTBEAT_S,
                       "stalled_worker_timeout": STALLED_S, "delete_jobs": "successful",
                       "fetch_job_polling_interval": 1.0}
            held = [infer_queue(model) for model in self.runners.models()]
            groups = [(held, 1)] if "infer" in self.queues and held else []
            others = [q for q in self.queues if q != "infer"]
            groups += [(others, STAGE_CONCURRENCY)] if others else []
            tasks = [asyncio.create_task(app.run_worker_async(
                queues=queues, concurrency=concurrency, **options))
                for queues, concurrency in groups]
            tasks.append(asyncio.create_task(self._sweep_forever(app)))
            log.info("worker %s: queues %s", self.name, ",".join(self.queues))
            self.ready.set()
            await self._stopping.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sweep_forever(self, app) -> None:
        """Re-defer what lacks its job, hand back the jobs of killed workers, and refresh
        this worker's row, every :data:`SWEEP_S` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                deferred = await loop.run_in_executor(self.stage_threads, sweep, self.outbox,
                                                      self.pipelines)
                if deferred:
                    log.info("sweep: deferred %s", ", ".join(deferred))
                stalled = await app.job_manager.get_stalled_jobs(
                    seconds_since_heartbeat=STALLED_S)
                for job in stalled:
                    await _hand_back(app, job)
                await loop.run_in_executor(self.stage_threads, self._announce)
            except Exception:  # the next sweep tries again
                log.exception("sweep failed")
            await asyncio.sleep(SWEEP_S)

    def _announce(self) -> None:
        self.db.announce_worker(self.name, self.queues, self.runners.devices(),
                                self.started_at)


async def _hand_back(app: procrastinate.App, job: Job) -> None:
    """Queue the job of a worker that stopped sending heartbeats again; if its key was
    deferred again meanwhile (a job of that key waits already), drop the stalled one
    instead: the waiting job does the same work, and the stalled one's lock would keep it
    from ever starting. Another worker's sweep may have handed it back first: then there is
    nothing left to do."""
    try:
        try:
            await app.job_manager.retry_job(job)
            outcome = "queued again"
        except UniqueViolation:
            await app.job_manager.finish_job(job, status=Status.ABORTED, delete_job=True)
            outcome = "dropped, a job of the same key waits already"
    except ConnectorException as exc:
        log.info("job %s (%s): handed back by another worker (%s)", job.id,
                 job.queueing_lock, exc)
        return
    log.warning("job %s (%s) of a worker that stopped sending heartbeats: %s", job.id,
                job.queueing_lock, outcome)
