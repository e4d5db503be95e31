"""One job of each queue, done by the stages' own code (the same objects the single-process
node polls with, not started as threads):

- ``select`` (a study UID): the pipelines that owe the study a decision decide it
  (:class:`~aiworker.select.worker.SelectionWorker`); a match queues a job, which defers its
  ``infer`` job in the same transaction.
- ``infer`` (a job id): the job is claimed and run in the worker's inference process, its
  models resident (:class:`~aiworker.infer.stage.InferenceWorker`); ``done`` defers
  ``results``.
- ``results`` (a job id): the job's result objects become outbox rows
  (:meth:`~aiworker.dispatch.stage.OutboxStage.queue_job`), which defer ``outbox``. Objects
  not on the shared storage yet raise :class:`NotThereYet`: the job is retried, not failed.
- ``outbox`` (a destination): due rows are sent (:meth:`OutboxStage.send_due`).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiworker.config import Config
from aiworker.dispatch.stage import OutboxStage, object_options
from aiworker.infer.process import worker_settings
from aiworker.infer.stage import InferenceWorker, resolve_models
from aiworker.results.objects import write_job_objects
from aiworker.select.decide import configured_pipelines, feature_settings
from aiworker.select.worker import SelectionWorker
from aiworker.store.db import StateDB
from aiworker.store.layout import DataPaths


class NotThereYet(Exception):
    """What a job needs is not on the shared storage (yet): procrastinate retries it."""


@dataclass
class StageRunners:
    """The stage objects of the queues a worker serves (None for the others)."""

    db: StateDB
    selector: SelectionWorker | None
    inferrer: InferenceWorker | None
    outbox: OutboxStage | None

    @classmethod
    def build(cls, config: Config, db: StateDB, queues: list[str]) -> StageRunners:
        """Raises RuleError or ManifestError as ``aiworker serve`` does."""
        pipelines = configured_pipelines(config)
        selector = SelectionWorker(db, pipelines, feature_settings(config)) \
            if "select" in queues else None
        inferrer = None
        if "infer" in queues:
            models = resolve_models(pipelines, config.inference.models_dir)
            inferrer = InferenceWorker(db, worker_settings(
                config, models, DataPaths(config.storage.data_dir).results,
                write_objects=write_job_objects, object_options=object_options(config)))
        outbox = OutboxStage(db, config, config.node.ae_title) \
            if {"results", "outbox"} & set(queues) else None
        return cls(db, selector, inferrer, outbox)

    def select(self, study_uid: str) -> None:
        assert self.selector is not None
        names = [p.name for p in self.selector.pipelines]
        for uid, completed_at, owed in self.db.awaiting_selection(names, study_uid):
            self.selector.select_study(uid, completed_at, owed)

    def infer(self, job_id: str) -> None:
        assert self.inferrer is not None
        if not self.inferrer.run_job_id(job_id):
            raise NotThereYet(f"job {job_id}: the results disk is below storage.min_free_mb")

    def results(self, job_id: str) -> None:
        assert self.outbox is not None
        jobs = self.db.jobs_to_dispatch(job_id)
        if not jobs or self.outbox.queue_job(jobs[0]):
            return
        pipeline = self.outbox.pipelines.get(jobs[0].pipeline)
        if pipeline is not None and pipeline.send_to:
            raise NotThereYet(f"job {job_id}: its result objects are not all there yet")

    def send(self, destination: str) -> None:
        assert self.outbox is not None
        self.outbox.send_due(destination)

    def models(self) -> list[str]:
        """The models an ``infer`` worker holds (resident once loaded)."""
        return sorted(self.inferrer.settings.models) if self.inferrer else []

    def devices(self) -> dict[str, str]:
        """Each resident model's device (``infer`` workers, once loaded)."""
        process = self.inferrer.process if self.inferrer else None
        return dict(process.ready.devices) if process and process.ready else {}

    def stop(self) -> None:
        """Let a running job end at its next check (the outbox between batches; a running
        inference is cut off and its job queued again)."""
        for stage in (self.selector, self.inferrer, self.outbox):
            if stage is not None:
                stage.request_stop()
