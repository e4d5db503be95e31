"""The infer stage of the node: queued jobs in, done or failed jobs out.

Models run outside the receiving process. :class:`InferenceWorker` is a thread of the node
that claims the oldest queued job (:meth:`StateDB.claim_job`) and hands it, as ids and
paths (never pixels), to the inference process (:mod:`aiworker.infer.process`), which
starts with the stage (its first tick), loads the models while the first study is still
arriving, and stays, its models resident, and runs it
(:func:`aiworker.infer.run.run_job`). The node adds ``total`` (the round trip) to the job's
timings and records it ``done`` or ``failed`` with its kind.

The time limit is ``inference.time_limit_s`` when set, else the model's
``inference.time_limit_s``; past it the node kills the inference process, fails the job as
``resource`` and starts a fresh process. A process that dies (the out-of-memory killer)
fails its job as ``resource`` and is replaced too. Stopping the node stops the process; a
job it was running is queued again.

A full disk is waited out: while the results folder's disk has less than
``storage.min_free_mb`` free, no job is claimed; a job that failed because the disk filled up
as it wrote (``disk full: ...``; what it had half written keeps its temporary name and is
never sent) is queued again once the space is back.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from aiworker.infer.manifest import ManifestError, ModelError
from aiworker.infer.process import InferenceProcess, ProcessGone, WorkerSettings
from aiworker.infer.registry import ModelSpec, Registry, model_id
from aiworker.infer.run import DISK_FULL, Failure, JobReply, JobRequest
from aiworker.infer.volume import VolumeError
from aiworker.polling import PollingStage
from aiworker.select.decide import Pipeline
from aiworker.store.db import StateDB
from aiworker.store.disk import free_mb
from aiworker.store.jobs import Job, worker_name
from aiworker.store.layout import ResultFolder

log = logging.getLogger("aiworker.infer")

LOAD_LIMIT_S = 600.0  # the inference process must have loaded its models by then
DISK_CHECK_S = 5.0  # how often a stage waiting for disk space looks again
STEPS = ("load", "preprocess", "model", "postprocess", "resample", "write", "seg", "sr", "report",
         "hl7", "preview", "total")


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
    channels = spec.manifest.roles
    if all(channel in roles for channel in channels):
        return list(channels)
    if len(roles) == len(channels):
        return list(roles)
    raise ModelError(f"{model_id(spec)} reads {len(channels)} series ({', '.join(channels)}) "
                     f"but the pipeline's roles are {', '.join(roles) or 'none'}")


class InferenceWorker(PollingStage):
    """Runs queued jobs one at a time in the inference process, until stopped; the next
    job at once after one ran."""

    name = "infer"
    again_at_once = True
    join_timeout_s = 30.0

    def __init__(self, db: StateDB, settings: WorkerSettings, interval: float = 0.1):
        super().__init__(interval)
        self.db = db
        self.settings = settings
        self.time_limit_s = settings.time_limit_s
        self.process: InferenceProcess | None = None
        self.disk_check_s = DISK_CHECK_S
        self._disk_checked_at = -DISK_CHECK_S
        self._disk_ok = True
        self._cut_off = False  # a claimed job's run or record raised: queue it again

    def start(self) -> None:
        for name, spec in sorted(self.settings.models.items()):
            limit = self.time_limit_s or spec.manifest.inference.time_limit_s
            log.info("model %s: %s from %s, time limit %g s", name, model_id(spec),
                     spec.folder, limit)
        super().start()

    def stop(self) -> None:
        """Stop claiming, stop the inference process, and queue again a job it was running."""
        super().stop()
        self._stop_process()  # the thread stops it; not when it never ran
        self.requeue_own()

    def requeue_own(self, reason: str = "node stopped") -> None:
        """Queue again the jobs this process was running (on a shared state, only its own:
        other workers' jobs run on)."""
        worker = worker_name() if self.db.shared else None
        requeued = self.db.requeue_running(reason, worker=worker)
        if requeued:
            log.info("jobs %s were running and are queued again", ", ".join(requeued))

    def load_models(self) -> None:
        """Start the inference process and wait until it holds its models (a worker of the
        ``infer`` queue does this at start, so its first job does not pay for it)."""
        self.process = self.process or InferenceProcess(self.settings)
        if self.process.wait_ready(LOAD_LIMIT_S, self._stop) is None:
            self._replace("did not load its models in time")

    def run_job_id(self, job_id: str) -> bool:
        """One ``infer`` queue job: claim the job and run it; False when it is not there to
        run (done, failed or superseded meanwhile) or the disk has no room (the caller
        tries again later)."""
        if not self._disk_has_room():
            return False
        job = self.db.claim_job_id(job_id)
        if job is None:
            return True
        self.run_job(job)
        return True

    def readiness(self) -> tuple[bool, str]:
        """Whether the models are usable, in words: found at start (else the node would not
        run); once the inference process has started (at the stage's first tick), loaded."""
        names = ", ".join(sorted(self.settings.models)) or "no models"
        process = self.process
        if process is None:
            return True, f"{names}: found at start; the inference process loads them next"
        if process.ready is None:
            alive = process.process.is_alive()
            return alive, f"{names}: the inference process is loading them" if alive else \
                "the inference process exited while loading the models"
        devices = process.ready.devices
        broken = sorted(name for name, device in devices.items() if device == "not loaded")
        if broken:
            return False, f"cannot be loaded: {', '.join(broken)} (see the node log)"
        return True, ", ".join(f"{n} on {d}" for n, d in sorted(devices.items()))

    def tick(self) -> bool:
        """Run the oldest queued job, if there is one and the disk has room; True when one
        ran."""
        if self._cut_off:  # the last job raised (the state full or locked): run it again
            self.requeue_own("its run could not be recorded")
            self._cut_off = False
        if self.process is None and self.settings.models:  # load them before the first job
            self.process = InferenceProcess(self.settings)
        if not self._disk_has_room():
            return False
        job = self.db.claim_job() if self.db.has_queued_job() else None
        if job is None:
            return False
        try:
            self.run_job(job)
        except Exception:  # left running, no run would ever end it: queued again next tick
            self._cut_off = True
            raise
        return True

    def run_job(self, job: Job) -> None:
        """Run a claimed job and record how it ended (unless the node is stopping)."""
        spec = self.settings.models.get(job.model)
        name = model_id(spec) if spec else job.model
        log.info("job %s started: model %s, attempt %d", job.job_id, name, job.attempts)
        try:
            request, limit = self._request(job, spec)
            reply = self._ask(request, limit)
        except (ModelError, VolumeError) as exc:
            reply = _failure(exc.kind, str(exc))
        if reply is None:  # stopping: the job is queued again by stop()
            return
        timings = reply.timings
        if reply.failure is None:
            warnings = ResultFolder(Path(reply.result_dir)).header_warnings() \
                if reply.result_dir else []
            self.db.finish_job(job.job_id, reply.findings or {}, timings,
                               reply.device or "", reply.result_dir or "", warnings)
            log.info("job %s done: model %s on %s, %s", job.job_id, name, reply.device,
                     _show_timings(timings), extra=_log_ids(job, timings))
        else:
            failure = reply.failure
            self.db.fail_job(job.job_id, failure.error, failure.kind, timings, reply.device)
            log.warning("job %s failed (%s): model %s: %s; %s", job.job_id, failure.kind,
                        name, failure.error, _show_timings(timings),
                        extra=_log_ids(job, timings))

    def _request(self, job: Job, spec: ModelSpec | None
                 ) -> tuple[JobRequest, float]:
        """The message for the inference process (the model and, per input channel, the
        paths of the series' stored instances) and the job's time limit in seconds."""
        if spec is None:
            raise ModelError(f"model {job.model!r} is not the model of any configured "
                             f"pipeline (models: {', '.join(sorted(self.settings.models))})")
        inputs = []
        for role in channel_roles(list(job.inputs), spec):
            paths = self.db.series_instance_paths(job.inputs[role])
            if not paths:
                raise VolumeError(f"series {job.inputs[role]} ({role}) has no stored "
                                  "instances")
            inputs.append(paths)
        request = JobRequest(job.job_id, job.model, inputs,
                             self.settings.results_dir / job.job_id,
                             self.settings.object_options.get(job.pipeline, {}))
        return request, self.time_limit_s or spec.manifest.inference.time_limit_s

    def _ask(self, request: JobRequest, limit: float) -> JobReply | None:
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
            reply.timings["total"] = round(time.perf_counter() - sent, 4)
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

    def finished(self) -> None:
        """Stop the inference process from the stage's thread: the one that started it,
        whose end the kernel would otherwise answer by killing it."""
        self._stop_process()


def _failure(kind: str, error: str) -> JobReply:
    """A failed job's reply made on the node's side."""
    return JobReply.failed(Failure(kind, error))


def _log_ids(job: Job, timings: dict[str, float]) -> dict[str, Any]:
    """The ids and duration a JSON log line of the job carries."""
    return {"job_id": job.job_id, "study_uid": job.study_uid,
            "series_uid": job.series_uid, "duration_s": timings.get("total")}


def _show_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{step} {timings[step]:.2f} s" for step in STEPS if step in timings)
