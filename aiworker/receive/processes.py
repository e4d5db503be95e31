"""Several receiving processes on one port, for many concurrent senders on several cores.

One Python process serves its associations in threads that share one interpreter lock, so
on a multi-core host concurrent senders are faster served by several processes. With
``node.receive_processes: N`` (N > 1) the node starts N worker processes; each binds the
DICOM port with SO_REUSEPORT (Linux), and the kernel spreads incoming connections over them.
Each worker has its own connection to the state DB (SQLite in WAL mode takes writers from
several processes) and writes to the same spool. The parent keeps the completion scheduler
and restarts a worker that dies; a worker dies with its parent, even one killed with -9
(:func:`~aiworker.lifetime.die_with_parent`), and holds the node's data folder lock while it
lives (:mod:`aiworker.store.lock`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import Any

from aiworker.config import Config
from aiworker.lifetime import die_with_parent
from aiworker.store.lock import SharedLock

log = logging.getLogger("aiworker.receive")


class ReceiverProcesses:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: Config, folder_lock: SharedLock | None = None):
        self.config = config
        self.folder_lock = folder_lock
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[BaseProcess] = []
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="receive-workers", daemon=True)

    def start(self) -> None:
        """Start the workers; returns once every one of them is listening."""
        self._workers = [self._spawn(i) for i in range(self.config.node.receive_processes)]
        self._watcher.start()

    def listening(self) -> bool:
        """Every receiving process is alive (the readiness check); one that died is being
        restarted."""
        return bool(self._workers) and all(worker.is_alive() for worker in self._workers)

    def stop(self) -> None:
        self._stopping.set()
        for worker in self._workers:
            worker.terminate()
        for worker in self._workers:
            worker.join(timeout=10)

    def _spawn(self, index: int) -> BaseProcess:
        listening = self._context.Event()
        worker = self._context.Process(
            target=_serve, name=f"receiver-{index}",
            args=(self.config.model_dump(mode="json"), os.getpid(), listening, self.folder_lock),
            daemon=True)
        worker.start()
        while not listening.wait(0.1):
            if not worker.is_alive():
                raise RuntimeError(f"receiving process {index} exited with {worker.exitcode}")
        return worker

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, worker in enumerate(self._workers):
                if not worker.is_alive() and not self._stopping.is_set():
                    log.error("receiving process %d exited (code %s); restarting it", i,
                              worker.exitcode)
                    self._workers[i] = self._spawn(i)


def _serve(config_data: dict[str, Any], parent_pid: int, listening: Any,
           folder_lock: SharedLock | None) -> None:
    """A worker's life: receive until the parent stops it or dies (holding ``folder_lock``
    all along)."""
    from aiworker import logs
    from aiworker.receive.scp import Receiver
    from aiworker.store.db import StateDB, state_location
    from aiworker.store.layout import DataPaths
    from aiworker.store.spool import Spool

    die_with_parent(parent_pid)
    config = Config.model_validate(config_data)
    logs.setup(config.logging.level, config.logging.format, config.logging.verbose)
    paths = DataPaths(config.storage.data_dir)
    receiver = Receiver(config, Spool(paths.spool, fsync=config.storage.fsync),
                        StateDB(state_location(config), config.state.busy_timeout_s),
                        shared_port=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    receiver.start()
    listening.set()
    stopping.wait()
    receiver.stop()

