"""One inference job, start to end: load its series, run the engine, write its results.

:func:`run_job` is the one place a job runs, for the node's inference process
(:mod:`aiworker.infer.process`) and for ``aiworker infer`` (:mod:`aiworker.offline`) alike.
It loads the input series (timing ``load``), runs the engine (``preprocess``, ``model``,
``postprocess``, ``resample``), passes the findings through the manifest's quality gate
(:mod:`aiworker.infer.gate`, counted in ``postprocess``: a result outside what the model was
trained on becomes "not assessable" with its reasons), writes ``labels.nii.gz`` (the
labels on the first input series' geometry) and ``findings.json`` into the job's folder
(``write``), each under a temporary name, flushed and renamed, and then, when it is given
a ``write_objects`` function, the job's result objects (``seg``, ``sr``, ``report``,
``hl7``, ``preview``).

Every failure becomes a :class:`JobReply` with a kind (:func:`classify_error`): ``data``
(the series cannot be read as one volume; the result objects cannot be made from it),
``model`` (the model cannot load or rejects the input; any unexpected error, named by its
type) or ``resource`` (out of memory, a device lost, a full disk: ``disk full: ...``).
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiworker.infer import gate
from aiworker.infer.manifest import ModelError
from aiworker.infer.registry import model_id
from aiworker.store.disk import free_mb, is_disk_full
from aiworker.store.files import atomic_write
from aiworker.store.layout import ResultFolder
from aiworker.store.spool import fsync_path

log = logging.getLogger("aiworker.infer")

DISK_FULL = "disk full"  # how the error of a job the full disk stopped begins

# (folder, source paths, loaded series, labels, findings, manifest, model id, options)
# -> seconds per object kind; a ValueError fails the job as data
WriteObjects = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class JobRequest:
    """What one job needs: its model (by the name the engines go by), the stored files of
    each input channel's series, where its results go, and its pipeline's object options.
    ``about``, when given, is written into ``findings.json`` around the findings."""

    job_id: str
    model: str
    inputs: list[list[str]]
    result_dir: Path
    objects: dict[str, Any] = field(default_factory=dict)
    about: dict[str, Any] | None = None


@dataclass
class Failure:
    """Why a job failed: its kind (``data``, ``model``, ``resource``) and the error."""

    kind: str
    error: str


@dataclass
class JobReply:
    """How a job ended: done with findings, or failed; the seconds of each step either way."""

    timings: dict[str, float] = field(default_factory=dict)
    findings: dict[str, Any] | None = None
    device: str | None = None
    result_dir: str | None = None
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @classmethod
    def failed(cls, failure: Failure, timings: dict[str, float] | None = None) -> JobReply:
        return cls(timings=timings or {}, failure=failure)


class ObjectsError(Exception):
    """The job's result objects cannot be made from its labels and source series."""

    kind = "data"


def run_job(request: JobRequest, engine: Any, write_objects: WriteObjects | None = None
            ) -> JobReply:
    """Run one job on a loaded engine; its reply (never raises for the job's own errors)."""
    from aiworker.infer.volume import load_series

    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        series = [load_series(paths) for paths in request.inputs]
        timings["load"] = round(time.perf_counter() - started, 4)
        result = engine.run(series)
        timings |= result.timings
        started = time.perf_counter()
        findings = gated(result, series, engine.spec.manifest)
        if "quality" in findings:  # the gate's checks count as postprocessing
            timings["postprocess"] = round(timings.get("postprocess", 0.0)
                                           + time.perf_counter() - started, 4)
        started = time.perf_counter()
        findings = json.loads(json.dumps(findings, default=_plain))
        document = findings if request.about is None else \
            request.about | {"device": result.device, "findings": findings}
        write_labels_and_findings(request.result_dir, result.label_image, document)
        timings["write"] = round(time.perf_counter() - started, 4)
        if write_objects is not None:
            timings |= _write_objects(write_objects, request, series[0], result.labels,
                                      findings, engine.spec)
    except Exception as exc:  # every failure becomes the job's error, with its kind
        failure = classify_error(exc)
        if failure.kind == "model" and not isinstance(exc, ModelError):
            log.exception("job %s: unexpected error", request.job_id)
        return JobReply.failed(failure, timings)
    return JobReply(timings=timings, findings=findings, device=result.device,
                    result_dir=str(request.result_dir))


def gated(result: Any, series: list[Any], manifest: Any) -> dict[str, Any]:
    """The run's findings through the manifest's quality gate (:mod:`aiworker.infer.gate`):
    unchanged without a ``gate:`` section, else with its verdict in ``quality``."""
    spec = manifest.gate
    if spec is None:
        return result.findings
    from aiworker.infer.preprocess import voxel_ml

    verdict = gate.judge(spec, manifest, series[0].image, result.labels,
                         voxel_ml(series[0].image), result.confidence)
    findings = gate.apply(result.findings, verdict, spec, manifest)
    if not verdict.assessable:
        log.info("series %s: not assessable (%d input/output checks failed)",
                 result.findings.get("series_uid"), len(verdict.reasons))
    return findings


def _write_objects(write: WriteObjects, request: JobRequest, loaded: Any, labels: Any,
                   findings: dict[str, Any], spec: Any) -> dict[str, float]:
    """The job's result objects, written by ``write`` from its first input series; their
    timings. A ``ValueError`` from it becomes an :class:`ObjectsError` (``data``)."""
    try:
        return write(request.result_dir, request.inputs[0], loaded, labels, findings,
                     spec.manifest, model_id(spec), request.objects)
    except ValueError as exc:
        raise ObjectsError(f"the result objects cannot be made: {exc}") from exc


def classify_error(exc: BaseException) -> Failure:
    """The failure of an exception: its own ``kind`` (data, model, resource), ``resource``
    for MemoryError and a full disk, else ``model`` named by the exception type."""
    if isinstance(exc, MemoryError):
        return Failure("resource", f"out of memory: {exc}".rstrip(": "))
    if is_disk_full(exc) or is_disk_full(exc.__cause__ or exc.__context__ or exc):
        return Failure("resource", f"{DISK_FULL}: {exc}")
    kind = getattr(exc, "kind", None)
    first_line = (str(exc).splitlines() or [""])[0]
    if kind in ("data", "model", "resource"):
        return Failure(kind, str(exc) or type(exc).__name__)
    return Failure("model", f"{type(exc).__name__}: {first_line}".rstrip(": "))


def write_labels_and_findings(folder: Path, label_image: Any, findings: dict[str, Any]) -> None:
    """``labels.nii.gz`` and ``findings.json`` in ``folder``, each written under a temporary
    name, flushed to disk and renamed, so a reader never sees half a file."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    result = ResultFolder(folder)
    labels = result.labels.with_name(f"partial-{result.labels.name}")
    sitk.WriteImage(label_image, str(labels), True)
    _check_whole(labels)
    fsync_path(labels)
    os.replace(labels, result.labels)
    atomic_write(result.findings, json.dumps(findings, indent=2) + "\n")


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
