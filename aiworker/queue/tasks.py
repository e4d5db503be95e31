"""The procrastinate app of a worker: one task per queue, each running its
:class:`~aiworker.queue.runners.StageRunners` method off the event loop - ``infer`` on the
one thread that owns the inference process (the kernel ties the process's life to the
thread that started it), the others on a small pool.

A task that raises is retried by procrastinate (every :data:`RETRY_WAIT_S` seconds, up to
:data:`RETRY_ATTEMPTS` times); past that the sweep defers it again, so the state is never
stuck. The stages record their own failures (a failed job, a dead outbox row) as they do in
the single-process node: those are not task errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import procrastinate

from aiworker.queue.runners import StageRunners
from aiworker.store.handoff import JOB_ARGS, TASKS

RETRY_WAIT_S = 2
RETRY_ATTEMPTS = 30


def build_app(url: str, runners: StageRunners, infer_thread: ThreadPoolExecutor,
              stage_threads: ThreadPoolExecutor) -> procrastinate.App:
    """The app over the state's database, its tasks bound to ``runners``."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    retry = procrastinate.RetryStrategy(max_attempts=RETRY_ATTEMPTS, wait=RETRY_WAIT_S)

    def task(queue: str, run: Callable[[str], None], pool: ThreadPoolExecutor) -> None:
        async def job(**kwargs: str) -> None:
            await asyncio.get_running_loop().run_in_executor(pool, run,
                                                             kwargs[JOB_ARGS[queue]])
        job.__name__ = f"{queue}_job"
        app.task(name=TASKS[queue], queue=queue, retry=retry)(job)

    task("select", runners.select, stage_threads)
    task("infer", runners.infer, infer_thread)
    task("results", runners.results, stage_threads)
    task("outbox", runners.send, stage_threads)
    return app
