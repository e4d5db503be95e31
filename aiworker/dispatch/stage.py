"""The node's outbox stage: queues each done job's result objects, then sends them.

Once a job is ``done`` and the objects its pipeline sends are written in its result folder
(``seg.dcm``, ``sr.dcm``, ``sc.dcm``, ``oru.hl7``), :meth:`OutboxStage.queue_done_jobs` adds
one outbox row per (object, destination) of the pipeline's ``send_to``, all rows of a job in
one transaction (:func:`dicom_objects`): a DICOM destination gets the SEG and the SR of the
pipeline's ``outputs`` that it ``accepts``, and the preview as a Secondary Capture when the
outputs name ``preview`` or when it takes ``sc`` but no ``seg`` (the picture in place of the
segmentation); an HL7 destination gets the ORU^R01 (output ``hl7``). A job that already has
rows is never queued again; sending it again is ``aiworker resend``. The stage's thread
recovers rows cut off by a crash once at start, then queues and sends (the
:class:`~aiworker.dispatch.outbox.Dispatcher`'s ``tick``) every ``dispatch.interval_s``. Log
lines and events carry ids only. A DICOMweb destination gets what a DICOM one would.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from aiworker.config import Config, DicomDestination, DicomWebDestination, PipelineSpec
from aiworker.dispatch.outbox import Dispatcher, default_senders
from aiworker.infer.gate import withheld_objects
from aiworker.polling import PollingStage
from aiworker.store.db import StateDB
from aiworker.store.jobs import Job
from aiworker.store.layout import HL7_FILE, SC_FILE, SEG_FILE, SR_FILE
from aiworker.store.outbox import NewObject, Outbox, RetryPolicy

log = logging.getLogger(__name__)

FILES = {"seg": SEG_FILE, "sr": SR_FILE, "sc": SC_FILE, "hl7": HL7_FILE}


def dicom_objects(pipeline: PipelineSpec,
                  destination: DicomDestination | DicomWebDestination) -> list[str]:
    """The DICOM objects (``seg``, ``sr``, ``sc``) a job of ``pipeline`` sends to
    ``destination`` (see the module's rules)."""
    wanted = [kind for kind in ("seg", "sr") if kind in pipeline.outputs
              and kind in destination.accepts]
    instead_of_seg = "seg" in pipeline.outputs and "seg" not in destination.accepts
    if "sc" in destination.accepts and ("preview" in pipeline.outputs or instead_of_seg):
        wanted.append("sc")
    return wanted


def object_options(config: Config) -> dict[str, dict[str, Any]]:
    """Per pipeline, the options its jobs' result objects are written with (the inference
    process's ``write_objects`` hook): the HL7 header and order settings, and whether a
    Secondary Capture is made (some destination of the pipeline gets one)."""
    options = {}
    for pipeline in config.pipelines:
        destinations = [config.destinations.get(name) for name in pipeline.send_to]
        secondary_capture = "preview" in pipeline.outputs or any(
            "sc" in dicom_objects(pipeline, d) for d in destinations
            if isinstance(d, DicomDestination | DicomWebDestination))
        options[pipeline.name] = {"hl7": config.hl7.model_dump(),
                                  "secondary_capture": secondary_capture}
    return options


def retry_policy(config: Config) -> RetryPolicy:
    """The outbox's retry policy from the ``dispatch`` section."""
    settings = config.dispatch
    return RetryPolicy(base_s=settings.retry_base_s, cap_s=settings.retry_cap_s,
                       max_age_s=settings.max_age_h * 3600.0)


def destination_policies(config: Config) -> dict[str, RetryPolicy]:
    """The retry policy of each destination with its own ``retry_horizon_h``."""
    base = retry_policy(config)
    return {name: replace(base, max_age_s=d.retry_horizon_h * 3600.0)
            for name, d in config.destinations.items() if d.retry_horizon_h is not None}


def job_objects(pipeline: PipelineSpec, config: Config, result_dir: Path) -> list[NewObject]:
    """The objects a job of ``pipeline`` sends: one per (output file, destination).
    Raises OSError while one of their files is not written yet. A SEG the quality gate
    withholds (a result that is not assessable) is not sent."""
    objects = []
    withheld = withheld_objects(result_dir)
    for name in pipeline.send_to:
        destination = config.destinations.get(name)
        if destination is None:
            continue
        if isinstance(destination, DicomDestination | DicomWebDestination):
            kinds = dicom_objects(pipeline, destination)
        else:
            kinds = ["hl7"] if "hl7" in pipeline.outputs else []
        for object_kind in (kind for kind in kinds if kind not in withheld):
            path = result_dir / FILES[object_kind]
            if not path.is_file():
                raise FileNotFoundError(path)
            objects.append(NewObject(name, destination.kind, object_kind, str(path),
                                     _sop_instance_uid(path, destination.kind)))
    return objects


def _sop_instance_uid(path: Path, kind: str) -> str | None:
    """A DICOM object's SOP Instance UID (what the PACS will hold); None for HL7."""
    if kind not in ("dicom", "dicomweb"):
        return None
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class OutboxStage(PollingStage):
    """Queues done jobs' objects and sends due rows from one thread until stopped."""

    name = "outbox"

    def __init__(self, db: StateDB, config: Config, calling_ae: str):
        super().__init__(config.dispatch.interval_s)
        self.db = db
        self.config = config
        self.pipelines = {p.name: p for p in config.pipelines}
        settings = config.dispatch
        self.dispatcher = Dispatcher(db, config.destinations,
                                     default_senders(calling_ae),
                                     policy=retry_policy(config),
                                     policies=destination_policies(config),
                                     batch_size=settings.batch_size)
        self.outbox: Outbox = self.dispatcher.outbox
        self._waiting: set[str] = set()  # jobs logged as waiting for their files

    def start(self) -> None:
        recovered = self.dispatcher.recover()
        if recovered:
            log.info("outbox: %d rows were being sent when the node stopped; pending again",
                     recovered)
        super().start()

    def join_timeout(self) -> float:
        return self._longest_send_s() + 10

    def _longest_send_s(self) -> float:
        """About how long one send may take at most, from the destinations' timeouts."""
        waits = [getattr(d, "connect_timeout_s", 0) + getattr(d, "acse_timeout_s", 0)
                 + getattr(d, "dimse_timeout_s", 0) + getattr(d, "ack_timeout_s", 0)
                 + getattr(d, "read_timeout_s", 0)
                 for d in self.config.destinations.values()]
        return max([self.config.dispatch.timeout_s, *waits])

    def tick(self) -> None:
        """Queue what is new, then send one due batch per destination."""
        self.queue_done_jobs()
        for name, report in self.dispatcher.tick().items():
            log.info("outbox %s: sent %d, retry %d, dead %d", name, report.sent,
                     report.retry, report.dead)

    def queue_done_jobs(self) -> list[str]:
        """Add the rows of every done job that sends somewhere, has its objects written
        and has no rows yet; returns the jobs queued."""
        return [job.job_id for job in self.db.jobs_to_dispatch() if self.queue_job(job)]

    def queue_job(self, job: Job) -> bool:
        """Add one done job's rows (or mark it delivered when it sends nowhere); False
        while its pipeline is not configured or its objects are not all written yet."""
        pipeline = self.pipelines.get(job.pipeline)
        if pipeline is None:  # no longer configured: kept until it is again
            return False
        if not pipeline.send_to:
            self.db.mark_dispatched(job.job_id)  # nothing to send: delivered
            return False
        objects = self._ready_objects(job, pipeline)
        if objects is None:
            return False
        ids = self.outbox.add(job.job_id, job.study_uid, objects)
        self.db.mark_dispatched(job.job_id)
        self.db.add_event("outbox_queued", job.study_uid, job.series_uid,
                          job_id=job.job_id, rows=len(ids))
        log.info("job %s: %d outbox rows queued", job.job_id, len(ids))
        return True

    def send_due(self, destination: str) -> int:
        """One ``outbox`` queue job: rows of ``destination`` left ``sending`` are pending
        again (only one such job runs per destination, so they were cut off), then due
        batches are sent until none is due. Returns the rows sent."""
        if destination not in self.dispatcher.destinations:
            return 0  # kept pending until a configuration names it again
        self.outbox.recover(destination=destination)
        sent = 0
        while not self.stopping:
            report = self.dispatcher.dispatch(destination, self.dispatcher.clock())
            if not (report.sent or report.retry or report.dead):
                break
            log.info("outbox %s: sent %d, retry %d, dead %d", destination, report.sent,
                     report.retry, report.dead)
            sent += report.sent
        return sent

    def _ready_objects(self, job: Job, pipeline: PipelineSpec) -> list[NewObject] | None:
        """The job's objects, or None while one of their files is not written yet."""
        folder = Path(job.result_dir)
        try:
            objects = job_objects(pipeline, self.config, folder)
        except (OSError, InvalidDicomError):
            if job.job_id not in self._waiting:
                self._waiting.add(job.job_id)
                log.info("job %s: waiting for its result objects", job.job_id)
            return None
        self._waiting.discard(job.job_id)
        return objects
