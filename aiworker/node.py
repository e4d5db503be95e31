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

``aiworker serve`` is :func:`serve`; tests and benchmarks start it the same way, as a
subprocess, so what they exercise is what operators run.
"""

from __future__ import annotations

import errno
import logging
import signal
import sqlite3
import threading
from collections.abc import Callable

from aiworker.config import Config
from aiworker.dispatch.stage import OutboxStage, object_options
from aiworker.infer.manifest import ManifestError
from aiworker.infer.process import worker_settings
from aiworker.infer.stage import InferenceWorker, resolve_models
from aiworker.receive.processes import ReceiverProcesses
from aiworker.receive.scp import Receiver
from aiworker.results.objects import write_job_objects
from aiworker.select.decide import configured_pipelines, feature_settings
from aiworker.select.rules import RuleError
from aiworker.select.worker import SelectionWorker
from aiworker.store.completion import CompletionScheduler
from aiworker.store.db import StateDB
from aiworker.store.layout import DataPaths
from aiworker.store.lock import DataFolderLock, FolderInUse
from aiworker.store.reconcile import reconcile
from aiworker.store.retention import RetentionPolicy, RetentionStage
from aiworker.store.spool import Spool
from aiworker.web.server import WebError, node_web_server

log = logging.getLogger("aiworker.node")

SIGNAL_CHECK_S = 0.2  # how often the main thread looks for a stop signal


class Node:
    """All the node's long-running parts, started and stopped together."""

    def __init__(self, config: Config):
        """Raises RuleError when a pipeline's rule file is missing or wrong, ManifestError
        when a pipeline's model is unknown or its manifest invalid, FolderInUse when another
        process holds the data folder."""
        self.config = config
        pipelines = configured_pipelines(config)
        models = resolve_models(pipelines, config.inference.models_dir)
        self.paths = DataPaths(config.storage.data_dir)
        self.lock = DataFolderLock(self.paths.root)
        self.lock.acquire()
        self.spool = Spool(self.paths.spool, fsync=config.storage.fsync)
        self.db = StateDB(self.paths.db)
        self.scheduler = CompletionScheduler(self.db, config.completion.series_stable_seconds)
        self.selector = SelectionWorker(self.db, pipelines, feature_settings(config))
        self.inferrer = InferenceWorker(self.db, worker_settings(
            config, models, self.paths.results,
            write_objects=write_job_objects,
            object_options=object_options(config), folder_lock=self.lock.shared()))
        self.outbox = OutboxStage(self.db, config, config.node.ae_title)
        storage = config.storage
        self.retention = RetentionStage(self.db, self.paths, RetentionPolicy(
            storage.retention_days, storage.emergency_free_percent),
            storage.retention_interval_s)
        self.receiver: Receiver | ReceiverProcesses
        if config.node.receive_processes > 1:
            self.receiver = ReceiverProcesses(config, self.lock.shared())
        else:
            self.receiver = Receiver(config, self.spool, self.db)
        self.web = node_web_server(config, self.paths.db, self.receiver, self.inferrer)

    def start(self) -> None:
        report = reconcile(self.spool, self.db, self.paths.quarantine)
        log.info("reconcile: %s", report)
        requeued = self.db.requeue_running("restart")
        if requeued:
            log.info("jobs %s were running when the node stopped; queued again",
                     ", ".join(requeued))
        self.scheduler.start()
        self.selector.start()
        self.inferrer.start()
        self.outbox.start()
        self.retention.start()
        self.receiver.start()
        if self.web is not None:
            self.web.start()

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.receiver.stop()
        self.scheduler.stop()
        self.selector.stop()
        self.inferrer.stop()
        self.outbox.stop()
        self.retention.stop()
        self.db.close()
        self.lock.release()


def serve(config: Config, on_ready: Callable[[], None] = lambda: None) -> None:
    """Run the node until SIGINT or SIGTERM; ``on_ready`` runs once every receiving process
    is listening."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        node = Node(config)
    except RuleError as exc:
        for line in exc.problems:
            log.error("rules error: %s", line)
        raise SystemExit(2) from exc
    except ManifestError as exc:
        for line in exc.problems:
            log.error("model error: %s", line)
        raise SystemExit(2) from exc
    except FolderInUse as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
    except (OSError, sqlite3.Error) as exc:
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
    # Wake now and then: a signal that the kernel hands to another thread (the libraries
    # of the infer stage start some) only runs its handler once the main thread runs.
    while not stopping.wait(SIGNAL_CHECK_S):
        pass
    log.info("stopping")
    node.stop()
