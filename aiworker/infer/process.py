"""The inference process: a child of the node that holds the models and runs jobs.

The infer stage (:mod:`aiworker.infer.stage`) starts it with multiprocessing's ``spawn``
and speaks to it over a pipe: a :class:`~aiworker.infer.run.JobRequest` out (ids and paths,
never pixels), a :class:`~aiworker.infer.run.JobReply` back. The process lowers its priority
(``inference.nice``), limits torch and SimpleITK to ``inference.threads`` threads, loads one
:class:`~aiworker.infer.engine.Engine` per model once (a model that cannot load fails each
of its jobs as ``model``), reports :class:`Ready`, and then runs each job with
:func:`~aiworker.infer.run.run_job` until the node sends None or goes away.

It dies with the node, even with a node killed with -9
(:func:`~aiworker.lifetime.die_with_parent`: the kernel kills it when the thread that
started it ends, so that thread also stops it), and holds the node's data folder lock
(``folder_lock``) while it lives, so a restarted node cannot start on the folder and run a
job again while an old inference process still runs it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiworker.config import Config
from aiworker.infer.registry import ModelSpec, model_id
from aiworker.infer.run import Failure, JobReply, JobRequest, WriteObjects, classify_error, run_job
from aiworker.lifetime import die_with_parent
from aiworker.store.lock import SharedLock

log = logging.getLogger("aiworker.infer")

POLL_S = 0.25  # how often a wait for the inference process looks at the stop flag


@dataclass(frozen=True)
class WorkerSettings:
    """What the inference process needs: the models by the name jobs use, and how to run."""

    models: dict[str, ModelSpec]  # pipeline model name -> the model it resolves to
    results_dir: Path
    device: str = "auto"
    time_limit_s: float | None = None  # None: each model's manifest says
    threads: int = 1
    nice: int = 10
    log_level: str = "INFO"
    log_format: str = "plain"
    log_verbose: bool = False
    write_objects: WriteObjects | None = None  # writes a done job's result objects
    object_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per pipeline
    folder_lock: SharedLock | None = None  # the node's data folder lock, held by the process
    min_free_mb: int = 0  # no job starts while the results folder's disk has less free


def worker_settings(config: Config, models: dict[str, ModelSpec], results_dir: Path,
                    write_objects: WriteObjects | None = None,
                    object_options: dict[str, dict[str, Any]] | None = None,
                    folder_lock: SharedLock | None = None) -> WorkerSettings:
    """The settings of the node's inference worker, from its config. ``write_objects`` is
    a module-level function (it travels to the process by name); ``object_options``
    (pipeline name -> plain options) go to it with each job of the pipeline."""
    return WorkerSettings(
        models=models, results_dir=results_dir, device=config.inference.device,
        time_limit_s=config.inference.time_limit_s,
        threads=config.inference.threads or default_threads(), nice=config.inference.nice,
        log_level=config.logging.level, log_format=config.logging.format,
        log_verbose=config.logging.verbose,
        write_objects=write_objects, object_options=object_options or {},
        folder_lock=folder_lock, min_free_mb=config.storage.min_free_mb)


def default_threads() -> int:
    """The CPUs this process may use: the model takes them all when nothing else wants
    them, and the inference process's niceness gives receiving the CPU when it does
    (measured by bench/receive_during_inference.py and bench/e2e.py)."""
    return len(os.sched_getaffinity(0))


class ProcessGone(Exception):
    """The inference process went away (or the node is stopping) before it replied."""


@dataclass(frozen=True)
class Ready:
    """The process's report once its models are loaded: the seconds that took, and the
    device of each model (``not loaded`` for one that failed)."""

    seconds: float
    devices: dict[str, str]


class InferenceProcess:
    """The child process that holds the models, spoken to over a pipe."""

    def __init__(self, settings: WorkerSettings):
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self.process = context.Process(target=serve_jobs, args=(theirs, settings, os.getpid()),
                                       name="aiworker-infer", daemon=True)
        self.process.start()
        theirs.close()
        self.ready: Ready | None = None
        self.busy = False  # a job was sent and its reply has not come

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self, limit: float, stop: threading.Event) -> Ready | None:
        """The process's report once its models are loaded; None past ``limit`` seconds."""
        if self.ready is None:
            self.ready = self._reply(limit, stop)
            if self.ready is not None:
                log.info("inference process %s ready in %.1f s: %s", self.pid,
                         self.ready.seconds, ", ".join(
                             f"{name} on {device}" for name, device
                             in sorted(self.ready.devices.items())))
        return self.ready

    def call(self, request: JobRequest, limit: float, stop: threading.Event
             ) -> JobReply | None:
        """Send one job; its reply, or None when none came within ``limit`` seconds."""
        try:
            self._conn.send(request)
        except OSError as exc:  # a broken pipe: the process is gone
            raise ProcessGone(self._death()) from exc
        self.busy = True
        reply = self._reply(limit, stop)
        self.busy = reply is None
        return reply

    def stop(self) -> None:
        """Ask the process to exit, which it does between jobs; kill it while it loads its
        models or runs a job, or when it does not exit."""
        if self.ready is not None and not self.busy:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=10)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self._conn.close()

    def _reply(self, limit: float, stop: threading.Event) -> Any:
        deadline = time.monotonic() + limit
        while (remaining := deadline - time.monotonic()) > 0:
            if self._conn.poll(min(remaining, POLL_S)):
                try:
                    return self._conn.recv()
                except (EOFError, OSError) as exc:
                    raise ProcessGone(self._death()) from exc
            if stop.is_set():
                raise ProcessGone("the node is stopping")
            if not self.process.is_alive():
                raise ProcessGone(self._death())
        return None

    def _death(self) -> str:
        """How the process ended, in words."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is None:
            return "the inference process stopped answering"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the out-of-memory killer?)" if -code == signal.SIGKILL else ""
            return f"the inference process was killed by {name}{hint}"
        return f"the inference process exited with code {code}"


# --- inside the inference process ---------------------------------------------------------


def serve_jobs(conn: Connection, settings: WorkerSettings, parent_pid: int) -> None:
    """The inference process: load every model once, then answer each job the node sends
    until it sends None or goes away (killed at once when the node dies)."""
    from aiworker import logs

    die_with_parent(parent_pid, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops us over the pipe
    os.nice(settings.nice)
    logs.setup(settings.log_level, settings.log_format, settings.log_verbose)
    started = time.perf_counter()
    engines, broken = _load_engines(settings)
    try:
        conn.send(Ready(round(time.perf_counter() - started, 3),
                        {name: str(engine.device) for name, engine in engines.items()}
                        | dict.fromkeys(broken, "not loaded")))
        while (request := conn.recv()) is not None:
            if request.model in broken:
                conn.send(JobReply.failed(broken[request.model]))
            else:
                conn.send(run_job(request, engines[request.model], settings.write_objects))
    except (EOFError, BrokenPipeError):  # the node went away: so do we
        return


def _load_engines(settings: WorkerSettings) -> tuple[dict[str, Any], dict[str, Failure]]:
    """An engine per model name (a model that two names resolve to is loaded once), and the
    failure of each model that could not load."""
    import SimpleITK as sitk
    import torch

    from aiworker.infer.engine import Engine

    torch.set_num_threads(settings.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    loaded: dict[str, Engine] = {}
    engines, broken = {}, {}
    for name, spec in settings.models.items():
        try:
            if model_id(spec) not in loaded:
                loaded[model_id(spec)] = Engine(spec, settings.device)
            engines[name] = loaded[model_id(spec)]
        except Exception as exc:  # recorded on each job of the model
            broken[name] = classify_error(exc)
            log.error("model %s cannot be loaded: %s", model_id(spec), broken[name].error)
    return engines, broken
