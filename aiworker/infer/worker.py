"""The infer stage of the node: queued jobs in, done or failed jobs out.

Models run outside the receiving process. :class:`InferenceWorker` is a thread of the node
that claims the oldest queued job (:meth:`StateDB.claim_job`) and hands it, as ids and
paths (never pixels), to the **inference process**: a child started with multiprocessing's
``spawn`` that lowers its priority (``inference.nice``), limits torch and SimpleITK to
``inference.threads`` threads, loads one :class:`~aiworker.infer.engine.Engine` per
pipeline model once, and then serves jobs over a pipe until the node stops. The process
starts with the first job and stays, its models resident.

For each job the inference process loads the input series (timing ``load``), runs the
engine (``preprocess``, ``model``, ``postprocess``, ``resample``), writes
``<data_dir>/results/<job_id>/labels.nii.gz`` (the labels on the source series' geometry)
and ``findings.json`` (``write``), and replies with the findings, timings and device; the
node adds ``total`` (the round trip) and records the job ``done``. When the settings name a
``write_objects`` function (``"module:function"``, imported in the inference process: the
node names :func:`aiworker.results.objects.write_job_objects`, a stage this one does not
import), it then writes the job's result objects into the same folder, given the options the
settings hold for the job's pipeline (``object_options``), and its timings (``seg``, ``sr``,
``report``, ``hl7``, ``preview``) join the job's; a ``ValueError`` from it fails the job as
``data``.

A job fails with a kind: ``data`` (the series cannot be read as one volume), ``model``
(the model cannot load, or rejects the input; any unexpected error, named by its type) or
``resource`` (out of memory, device lost, the time limit, a full disk).

A full disk is waited out: while the results folder's disk has less than
``storage.min_free_mb`` free, no job is claimed; a job that failed because the disk filled up
as it wrote (``disk full: ...``; what it had half written keeps its temporary name and is
never sent) is queued again once the space is back. The time limit is
``inference.time_limit_s`` when set, else the model's ``inference.time_limit_s``; past it
the node kills the inference process, fails the job and starts a fresh process. A process
that dies (the out-of-memory killer) fails its job as ``resource`` and is replaced too.
Stopping the node stops the process; a job it was running is queued again.

The inference process dies with the node, even with a node killed with -9
(:func:`~aiworker.lifetime.die_with_parent`: the kernel kills it when the infer thread that
started it ends, so that thread also stops it). It holds the node's data folder lock
(``folder_lock``) while it lives, so a restarted node cannot start on the folder and run a
job again while an old inference process still runs it.
"""

from __future__ import annotations

import errno
import gzip
import importlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiworker.config import Config
from aiworker.infer.manifest import ManifestError, ModelError
from aiworker.infer.registry import ModelSpec, Registry, model_id
from aiworker.infer.volume import VolumeError
from aiworker.lifetime import die_with_parent
from aiworker.select.decide import Pipeline
from aiworker.store.db import StateDB
from aiworker.store.disk import free_mb, is_disk_full
from aiworker.store.lock import SharedLock
from aiworker.store.spool import fsync_path

log = logging.getLogger("aiworker.infer")

LABELS_FILE = "labels.nii.gz"
FINDINGS_FILE = "findings.json"
LOAD_LIMIT_S = 600.0  # the inference process must have loaded its models by then
POLL_S = 0.25  # how often a wait for the inference process looks at the stop flag
DISK_CHECK_S = 5.0  # how often a stage waiting for disk space looks again
DISK_FULL = "disk full"  # how the error of a job the full disk stopped begins
STEPS = ("load", "preprocess", "model", "postprocess", "resample", "write", "seg", "sr", "report",
         "hl7", "preview", "total")


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
    write_objects: str | None = None  # "module:function" writing a done job's result objects
    object_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per pipeline
    folder_lock: SharedLock | None = None  # the node's data folder lock, held by the process
    min_free_mb: int = 0  # no job starts while the results folder's disk has less free


def worker_settings(config: Config, models: dict[str, ModelSpec], results_dir: Path,
                    write_objects: str | None = None,
                    object_options: dict[str, dict[str, Any]] | None = None,
                    folder_lock: SharedLock | None = None) -> WorkerSettings:
    """The settings of the node's inference worker, from its config; ``object_options``
    (pipeline name -> plain options) go to ``write_objects`` with each job of the pipeline."""
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


def resolve_models(pipelines: list[Pipeline], models_dir: Path | None) -> dict[str, ModelSpec]:
    """The model of every pipeline, by the name the pipeline gives it.

    Raises :class:`ManifestError` with one line per problem: an invalid manifest, a model
    no folder holds, or a model whose input channels the pipeline's roles cannot feed.
    """
    try:
        registry = Registry(models_dir)
    except ManifestError:
        raise
    except ModelError as exc:
        raise ManifestError([f"inference.models_dir: {exc}"]) from exc
    models: dict[str, ModelSpec] = {}
    problems = []
    for index, pipeline in enumerate(pipelines):
        where = f"pipelines.{index}.model ({pipeline.name})"
        try:
            spec = registry.get(pipeline.model)
            channel_roles([role.name for role in pipeline.rules.roles], spec)
        except ModelError as exc:
            problems.append(f"{where}: {exc}")
            continue
        models[pipeline.model] = spec
    if problems:
        raise ManifestError(problems)
    return models


def channel_roles(roles: list[str], spec: ModelSpec) -> list[str]:
    """The role whose series feeds each input channel of the model, in channel order: by
    name when every channel is a role, else in order when the counts agree."""
    channels = spec.manifest.input.channels
    if all(channel in roles for channel in channels):
        return list(channels)
    if len(roles) == len(channels):
        return list(roles)
    raise ModelError(f"{model_id(spec)} reads {len(channels)} series ({', '.join(channels)}) "
                     f"but the pipeline's roles are {', '.join(roles) or 'none'}")


class ProcessGone(Exception):
    """The inference process went away (or the node is stopping) before it replied."""


class InferenceWorker:
    """Runs queued jobs one at a time in the inference process, until stopped."""

    def __init__(self, db: StateDB, settings: WorkerSettings, interval: float = 0.1):
        self.db = db
        self.settings = settings
        self.time_limit_s = settings.time_limit_s
        self.interval = interval
        self.process: InferenceProcess | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infer", daemon=True)
        self.disk_check_s = DISK_CHECK_S
        self._disk_checked_at = -DISK_CHECK_S
        self._disk_ok = True

    def start(self) -> None:
        for name, spec in sorted(self.settings.models.items()):
            limit = self.time_limit_s or spec.manifest.inference.time_limit_s
            log.info("model %s: %s from %s, time limit %g s", name, model_id(spec),
                     spec.folder, limit)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, stop the inference process, and queue again a job it was running."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._stop_process()  # the thread stops it; not when it never ran
        requeued = self.db.requeue_running("node stopped")
        if requeued:
            log.info("jobs %s were running and are queued again", ", ".join(requeued))

    def tick(self) -> bool:
        """Run the oldest queued job, if there is one and the disk has room; True when one
        ran."""
        if not self._disk_has_room():
            return False
        job = self.db.claim_job() if self.db.has_queued_job() else None
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_job(self, job: dict[str, Any]) -> None:
        """Run a claimed job and record how it ended (unless the node is stopping)."""
        spec = self.settings.models.get(job["model"])
        name = model_id(spec) if spec else job["model"]
        log.info("job %s started: model %s, attempt %d", job["job_id"], name, job["attempts"])
        try:
            request, limit = self._request(job, spec)
            reply = self._ask(request, limit)
        except (ModelError, VolumeError) as exc:
            reply = _failure(exc.kind, str(exc))
        if reply is None:  # stopping: the job is queued again by stop()
            return
        timings = reply["timings"]
        if reply["ok"]:
            self.db.finish_job(job["job_id"], reply["findings"], timings, reply["device"],
                               reply["result_dir"])
            log.info("job %s done: model %s on %s, %s", job["job_id"], name, reply["device"],
                     _show_timings(timings), extra=_log_ids(job, timings))
        else:
            self.db.fail_job(job["job_id"], reply["error"], reply["kind"], timings,
                             reply.get("device"))
            log.warning("job %s failed (%s): model %s: %s; %s", job["job_id"], reply["kind"],
                        name, reply["error"], _show_timings(timings),
                        extra=_log_ids(job, timings))

    def _request(self, job: dict[str, Any], spec: ModelSpec | None
                 ) -> tuple[dict[str, Any], float]:
        """The message for the inference process (the model and, per input channel, the
        paths of the series' stored instances) and the job's time limit in seconds."""
        if spec is None:
            raise ModelError(f"model {job['model']!r} is not the model of any configured "
                             f"pipeline (models: {', '.join(sorted(self.settings.models))})")
        inputs = []
        for role in channel_roles(list(job["inputs"]), spec):
            paths = self.db.series_instance_paths(job["inputs"][role])
            if not paths:
                raise VolumeError(f"series {job['inputs'][role]} ({role}) has no stored "
                                  "instances")
            inputs.append(paths)
        request = {"job_id": job["job_id"], "model": job["model"], "inputs": inputs,
                   "result_dir": str(self.settings.results_dir / job["job_id"]),
                   "objects": self.settings.object_options.get(job["pipeline"], {})}
        return request, self.time_limit_s or spec.manifest.inference.time_limit_s

    def _ask(self, request: dict[str, Any], limit: float) -> dict[str, Any] | None:
        """The inference process's reply, its timings with ``total`` (from sending the job
        to the reply), or a ``resource`` failure when the process did not load its models,
        died, or passed ``limit`` seconds (it is then replaced); None when the node is
        stopping."""
        process = self.process = self.process or InferenceProcess(self.settings)
        sent = None
        try:
            if process.wait_ready(LOAD_LIMIT_S, self._stop) is None:
                self._replace("did not load its models in time")
                return _failure("resource", "the inference process did not load its models "
                                            f"within {LOAD_LIMIT_S:g} s")
            sent = time.perf_counter()
            reply = process.call(request, limit, self._stop)
        except ProcessGone as exc:
            if self._stop.is_set():
                return None
            self._replace("died")
            reply = _failure("resource", str(exc))
        if reply is None:
            self._replace("passed the time limit")
            reply = _failure("resource", f"stopped after the time limit of {limit:g} s")
        if sent is not None:
            reply["timings"]["total"] = round(time.perf_counter() - sent, 4)
        return reply

    def _replace(self, why: str) -> None:
        """Kill the inference process and start a fresh one for the next job."""
        if self.process is not None:
            log.warning("inference process %s %s; starting a new one", self.process.pid, why)
            self.process.kill()
        self.process = InferenceProcess(self.settings)

    def _disk_has_room(self) -> bool:
        """Whether the results folder's disk is above the floor (looked at every
        :data:`DISK_CHECK_S`); when the space comes back, jobs the full disk failed are
        queued again."""
        if time.monotonic() - self._disk_checked_at < self.disk_check_s:
            return self._disk_ok
        self._disk_checked_at = time.monotonic()
        free = free_mb(self.settings.results_dir)
        was_ok, self._disk_ok = self._disk_ok, free >= self.settings.min_free_mb
        if not self._disk_ok and was_ok:
            log.warning("%d MB free for results, below storage.min_free_mb (%d MB): no job "
                        "starts until there is room", free, self.settings.min_free_mb)
        if self._disk_ok:
            for job_id in self.db.failed_job_ids("resource", DISK_FULL):
                self.db.retry_job(job_id)
                log.info("job %s failed on a full disk; queued again now that %d MB are "
                         "free", job_id, free)
        return self._disk_ok

    def _stop_process(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def _run(self) -> None:
        """Tick until stopped, then stop the inference process from this thread: the one
        that started it, whose end the kernel would otherwise answer by killing it."""
        try:
            while not self._stop.is_set():
                try:
                    ran = self.tick()
                except Exception:  # keep the stage alive; the next tick retries
                    log.exception("inference tick failed")
                    ran = False
                if not ran:
                    self._stop.wait(self.interval)
        finally:
            self._stop_process()


def _failure(kind: str, error: str) -> dict[str, Any]:
    """A failed job's reply made on the node's side."""
    return {"ok": False, "kind": kind, "error": error, "timings": {}}


def _log_ids(job: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The ids and duration a JSON log line of the job carries."""
    return {"job_id": job["job_id"], "study_uid": job["study_uid"],
            "series_uid": job["series_uid"], "duration_s": timings.get("total")}


def _show_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{step} {timings[step]:.2f} s" for step in STEPS if step in timings)


class InferenceProcess:
    """The child process that holds the models, spoken to over a pipe."""

    def __init__(self, settings: WorkerSettings):
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self.process = context.Process(target=serve_jobs, args=(theirs, settings, os.getpid()),
                                       name="aiworker-infer", daemon=True)
        self.process.start()
        theirs.close()
        self.ready: dict[str, Any] | None = None
        self.busy = False  # a job was sent and its reply has not come

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self, limit: float, stop: threading.Event) -> dict[str, Any] | None:
        """The process's report once its models are loaded; None past ``limit`` seconds."""
        if self.ready is None:
            self.ready = self._reply(limit, stop)
            if self.ready is not None:
                log.info("inference process %s ready in %.1f s: %s", self.pid,
                         self.ready["seconds"], ", ".join(
                             f"{name} on {device}" for name, device
                             in sorted(self.ready["devices"].items())))
        return self.ready

    def call(self, request: dict[str, Any], limit: float, stop: threading.Event
             ) -> dict[str, Any] | None:
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

    def _reply(self, limit: float, stop: threading.Event) -> dict[str, Any] | None:
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
        conn.send({"seconds": round(time.perf_counter() - started, 3),
                   "devices": {name: str(engine.device) for name, engine in engines.items()}
                   | {name: "not loaded" for name in broken}})
        while (request := conn.recv()) is not None:
            conn.send(run_request(request, engines, broken, settings.write_objects))
    except (EOFError, BrokenPipeError):  # the node went away: so do we
        return


def _load_engines(settings: WorkerSettings) -> tuple[dict[str, Any], dict[str, dict]]:
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
            log.error("model %s cannot be loaded: %s", model_id(spec), broken[name]["error"])
    return engines, broken


def run_request(request: dict[str, Any], engines: dict[str, Any], broken: dict[str, dict],
                write_objects: str | None = None) -> dict[str, Any]:
    """Run one job: load its series, run the engine, write the results and, when
    ``write_objects`` names a function, the result objects; the reply."""
    from aiworker.infer.volume import load_series

    timings: dict[str, float] = {}
    if request["model"] in broken:
        return {"ok": False, "timings": timings} | broken[request["model"]]
    try:
        started = time.perf_counter()
        series = [load_series(paths) for paths in request["inputs"]]
        timings["load"] = round(time.perf_counter() - started, 4)
        engine = engines[request["model"]]
        result = engine.run(series)
        timings |= result.timings
        started = time.perf_counter()
        findings = json.loads(json.dumps(result.findings, default=_plain))
        write_results(Path(request["result_dir"]), result.label_image, findings)
        timings["write"] = round(time.perf_counter() - started, 4)
        if write_objects:
            timings |= _write_objects(write_objects, request, series[0], result.labels,
                                      findings, engine.spec)
    except Exception as exc:  # every failure becomes the job's error, with its kind
        failure = classify_error(exc)
        if failure["kind"] == "model" and not isinstance(exc, ModelError):
            log.exception("job %s: unexpected error", request["job_id"])
        return {"ok": False, "timings": timings} | failure
    return {"ok": True, "findings": findings, "timings": timings,
            "device": result.device, "result_dir": request["result_dir"]}


class ObjectsError(Exception):
    """The job's result objects cannot be made from its labels and source series."""

    kind = "data"


def _write_objects(target: str, request: dict[str, Any], loaded: Any, labels: Any,
                   findings: dict[str, Any], spec: ModelSpec) -> dict[str, float]:
    """Call the function ``target`` names (``"module:function"``) to write the result
    objects of the job's first input series into its result folder; its timings.

    A ``ValueError`` it raises (the labels or the source cannot make the objects) becomes an
    :class:`ObjectsError`, failing the job as ``data``."""
    module, _, name = target.partition(":")
    write: Callable[..., dict[str, float]] = getattr(importlib.import_module(module), name)
    try:
        return write(Path(request["result_dir"]), request["inputs"][0], loaded, labels,
                     findings, spec.manifest, model_id(spec), request.get("objects", {}))
    except ValueError as exc:
        raise ObjectsError(f"the result objects cannot be made: {exc}") from exc


def classify_error(exc: BaseException) -> dict[str, str]:
    """The failure kind and message of an exception: its own ``kind`` (data, model,
    resource), ``resource`` for MemoryError, else ``model`` named by the exception type."""
    if isinstance(exc, MemoryError):
        return {"kind": "resource", "error": f"out of memory: {exc}".rstrip(": ")}
    if is_disk_full(exc) or is_disk_full(exc.__cause__ or exc.__context__ or exc):
        return {"kind": "resource", "error": f"{DISK_FULL}: {exc}"}
    kind = getattr(exc, "kind", None)
    first_line = (str(exc).splitlines() or [""])[0]
    if kind in ("data", "model", "resource"):
        return {"kind": kind, "error": str(exc) or type(exc).__name__}
    return {"kind": "model", "error": f"{type(exc).__name__}: {first_line}".rstrip(": ")}


def write_results(folder: Path, label_image: Any, findings: dict[str, Any]) -> None:
    """``labels.nii.gz`` and ``findings.json`` in ``folder``, each written under a temporary
    name, flushed to disk and renamed, so a reader never sees half a file."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    labels = folder / f"partial-{LABELS_FILE}"
    sitk.WriteImage(label_image, str(labels), True)
    _check_whole(labels)
    fsync_path(labels)
    os.replace(labels, folder / LABELS_FILE)
    text = folder / f"partial-{FINDINGS_FILE}"
    text.write_text(json.dumps(findings, indent=2), encoding="utf-8")
    fsync_path(text)
    os.replace(text, folder / FINDINGS_FILE)


def _check_whole(path: Path) -> None:
    """Raise OSError unless the gzip file at ``path`` is whole: ITK says nothing when the
    disk fills up as it writes, and leaves a cut-off file."""
    try:
        with gzip.open(path) as written:
            while written.read(1 << 20):
                pass
    except (EOFError, OSError) as exc:
        full = free_mb(path.parent) == 0
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      f"{path.name} was cut off as it was written") from exc


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
