"""The running node: opens the store, reconciles it, starts the completion scheduler, the
select stage, the infer stage, the outbox stage, retention (:mod:`aiworker.store.retention`),
the SCP and the web server (dashboard, API, health, metrics: :mod:`aiworker.web`; a web port
in use stops ``aiworker serve`` with exit code 1).

At start every pipeline's model is resolved in the model registry (bundled models plus
``inference.models_dir``); an unknown model or an invalid manifest stops ``aiworker serve``
with one line per problem and exit code 2. A data folder that another node (or a process an
old node left) holds stops it with one line naming that process and exit code 1
(:mod:`aiworker.store.lock`). Jobs still ``running`` from a crash are queued again before the
infer stage starts.

On a shared PostgreSQL state (``state.url``) the stages run as queue jobs
(:mod:`aiworker.queue`): ``--role all`` (the default) runs a worker of every queue in the
node, ``--role receive`` only the SCP, the completion scheduler, retention and the web
server, so that several receivers and ``aiworker worker`` processes share one database and
one ``storage.data_dir``. There the data folder is not locked (the processes share it by
design) and jobs another process runs are never queued again at start: a killed worker's
jobs come back through procrastinate's stalled-job retry. An unreachable server or a bad URL
stops the start with one line and exit code 1.

``aiworker serve`` is :func:`serve`, ``aiworker worker`` is :func:`work`; tests and
benchmarks start them the same way, as subprocesses, so what they exercise is what
operators run.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from aiworker.config import Config
from aiworker.dispatch.stage import OutboxStage, object_options
from aiworker.infer.manifest import ManifestError
from aiworker.infer.process import worker_settings
from aiworker.infer.stage import InferenceWorker, resolve_models
from aiworker.queue.worker import QueueWorker
from aiworker.receive.processes import ReceiverProcesses
from aiworker.receive.scp import Receiver
from aiworker.results.objects import write_job_objects
from aiworker.select.decide import configured_pipelines, feature_settings
from aiworker.select.rules import RuleError
from aiworker.select.worker import SelectionWorker
from aiworker.store.backend import STATE_ERRORS, describe
from aiworker.store.completion import CompletionScheduler
from aiworker.store.db import StateDB, state_location
from aiworker.store.handoff import QUEUES
from aiworker.store.layout import DataPaths
from aiworker.store.lock import DataFolderLock, FolderInUse
from aiworker.store.reconcile import reconcile
from aiworker.store.retention import RetentionPolicy, RetentionStage
from aiworker.store.spool import Spool
from aiworker.web.server import WebError, node_web_server

log = logging.getLogger("aiworker.node")

SIGNAL_CHECK_S = 0.2  # how often the main thread looks for a stop signal


ROLES = ("all", "receive")


class RoleError(Exception):
    """A role the configuration cannot run."""


class ReceiveOnly:
    """The models' readiness on a receiving node: they run on the workers."""

    @staticmethod
    def readiness() -> tuple[bool, str]:
        return True, "receive role: models run on the workers (aiworker status lists them)"


class Node:
    """All the node's long-running parts, started and stopped together."""

    def __init__(self, config: Config, role: str = "all"):
        """Raises RuleError when a pipeline's rule file is missing or wrong, ManifestError
        when a pipeline's model is unknown or its manifest invalid, FolderInUse when another
        process holds the data folder, RoleError for ``receive`` on SQLite."""
        self.config = config
        shared = config.state.url is not None
        if role == "receive" and not shared:
            raise RoleError("--role receive needs a shared state: set state.url "
                            "(AIWORKER_STATE__URL) to postgresql://USER[:PASS]@HOST:PORT/DB")
        pipelines = configured_pipelines(config)
        models = resolve_models(pipelines, config.inference.models_dir) \
            if role == "all" and not shared else {}
        self.paths = DataPaths(config.storage.data_dir)
        self.lock = None if shared else DataFolderLock(self.paths.root)
        if self.lock is not None:
            self.lock.acquire()
        folder_lock = self.lock.shared() if self.lock is not None else None
        self.spool = Spool(self.paths.spool, fsync=config.storage.fsync)
        self.db = StateDB(state_location(config), config.state.busy_timeout_s)
        self.scheduler = CompletionScheduler(self.db, config.completion.series_stable_seconds)
        self.stages: list[Any] = []  # the job side: polling stages, or a queue worker
        self.inferrer: Any = ReceiveOnly()
        if role == "all" and shared:
            worker = QueueWorker(config, self.db, list(QUEUES))
            self.stages, self.inferrer = [worker], worker
        elif role == "all":
            self.inferrer = InferenceWorker(self.db, worker_settings(
                config, models, self.paths.results, write_objects=write_job_objects,
                object_options=object_options(config), folder_lock=folder_lock))
            self.stages = [SelectionWorker(self.db, pipelines, feature_settings(config)),
                           self.inferrer, OutboxStage(self.db, config, config.node.ae_title)]
        storage = config.storage
        self.retention = RetentionStage(self.db, self.paths, RetentionPolicy(
            storage.retention_days, storage.emergency_free_percent),
            storage.retention_interval_s)
        self.receiver: Receiver | ReceiverProcesses
        if config.node.receive_processes > 1:
            self.receiver = ReceiverProcesses(config, folder_lock)
        else:
            self.receiver = Receiver(config, self.spool, self.db)
        self.web = node_web_server(config, state_location(config), self.receiver,
                                   self.inferrer)

    def start(self) -> None:
        report = reconcile(self.spool, self.db, self.paths.quarantine)
        log.info("reconcile: %s", report)
        if not self.db.shared:
            requeued = self.db.requeue_running("restart")
            if requeued:
                log.info("jobs %s were running when the node stopped; queued again",
                         ", ".join(requeued))
        self.scheduler.start()
        for stage in self.stages:
            stage.start()
        self.retention.start()
        self.receiver.start()
        if self.web is not None:
            self.web.start()

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.receiver.stop()
        self.scheduler.stop()
        for stage in self.stages:
            stage.stop()
        self.retention.stop()
        self.db.close()
        if self.lock is not None:
            self.lock.release()


def serve(config: Config, on_ready: Callable[[], None] = lambda: None,
          role: str = "all") -> None:
    """Run the node until SIGINT or SIGTERM; ``on_ready`` runs once every receiving process
    is listening."""
    stopping = _stop_on_signals()
    try:
        node = Node(config, role)
    except RuleError as exc:
        for line in exc.problems:
            log.error("rules error: %s", line)
        raise SystemExit(2) from exc
    except ManifestError as exc:
        for line in exc.problems:
            log.error("model error: %s", line)
        raise SystemExit(2) from exc
    except (FolderInUse, RoleError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
    except STATE_ERRORS as exc:
        _state_error(config, exc)
    except OSError as exc:
        log.error("cannot open the data dir %s: %s", config.storage.data_dir, exc)
        raise SystemExit(1) from exc
    try:
        node.start()
    except WebError as exc:
        log.error("%s", exc)
        node.stop()
        raise SystemExit(1) from exc
    except (OSError, RuntimeError) as exc:
        where = f"{config.node.host}:{config.node.port}"
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            log.error("the DICOM port %s is in use by another process: stop it, or set "
                      "node.port (AIWORKER_NODE__PORT)", where)
        else:
            log.error("cannot start receiving on %s: %s", where, exc)
        node.stop()
        raise SystemExit(1) from exc
    on_ready()
    _wait(stopping)
    node.stop()


def work(config: Config, queues: list[str]) -> None:
    """``aiworker worker``: run the jobs of ``queues`` from the shared state (and the web
    server's health, metrics and dashboard when ``web.enabled``) until SIGINT or
    SIGTERM."""
    stopping = _stop_on_signals()
    if config.state.url is None:
        log.error("aiworker worker needs a shared state: set state.url "
                  "(AIWORKER_STATE__URL) to postgresql://USER[:PASS]@HOST:PORT/DB")
        raise SystemExit(1)
    try:
        db = StateDB(state_location(config))
        worker = QueueWorker(config, db, queues)
    except STATE_ERRORS as exc:
        _state_error(config, exc)
    except (RuleError, ManifestError) as exc:
        for line in exc.problems:
            log.error("%s", line)
        raise SystemExit(2) from exc
    web = node_web_server(config, state_location(config), None, worker)
    worker.start()
    try:
        if web is not None:
            web.start()
    except WebError as exc:
        log.error("%s", exc)
        worker.stop()
        raise SystemExit(1) from exc
    _wait(stopping)
    if web is not None:
        web.stop()
    worker.stop()
    db.close()


def _stop_on_signals() -> threading.Event:
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    return stopping


def _wait(stopping: threading.Event) -> None:
    # Wake now and then: a signal that the kernel hands to another thread (the libraries
    # of the infer stage start some) only runs its handler once the main thread runs.
    while not stopping.wait(SIGNAL_CHECK_S):
        pass
    log.info("stopping")


def _state_error(config: Config, exc: Exception) -> None:
    """One line for a state that cannot be opened, and exit code 1."""
    where = describe(state_location(config))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.error("cannot open the state at %s: %s", where, first)
    raise SystemExit(1) from exc
