"""All result objects of one model run, written into one folder.

:func:`write_results` turns a run's labels and findings into the files that go to the PACS
and the RIS: ``seg.dcm`` (:mod:`~aiworker.results.seg`), ``sr.dcm``
(:mod:`~aiworker.results.sr`, referencing the SEG's segments), ``report.txt``
(:mod:`~aiworker.results.report`), ``oru.hl7`` (:mod:`~aiworker.results.hl7`, carrying the
report) and ``preview.png`` (:mod:`~aiworker.results.preview`, for the dashboard and the
reader); with ``secondary_capture`` also ``sc.dcm``, the preview as a DICOM Secondary
Capture for PACS viewers that cannot show a SEG; and ``warnings.json``, the source header
values the objects do not carry as they were (see :mod:`~aiworker.results.patient`: the
patient and study are read once, cleaned, and every object carries the same). Each file is
written under a temporary name, fsynced and renamed, so a crash never leaves half an object
under its real name. A classification-only model (no ``outputs.segmentation``) has no
``seg.dcm``: its SR states the findings and the preview shows the slice it names. A result
the quality gate found not assessable has no ``seg.dcm``
unless its manifest's ``gate.send_seg_when_not_assessable`` says so (its SR then references
no segment; :func:`~aiworker.infer.gate.withheld_objects` tells the outbox). Their UIDs and
the HL7 control id are derived from the series and the model, so writing them again gives
the same objects.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from aiworker.infer import gate
from aiworker.infer.manifest import Manifest
from aiworker.infer.volume import LoadedSeries
from aiworker.results.hl7 import Hl7Settings, build_oru
from aiworker.results.patient import read_patient_study, sanitized_source
from aiworker.results.preview import (
    PreviewError,
    acl_label,
    build_secondary_capture,
    preview_slice,
    render_preview,
    slice_source,
)
from aiworker.results.report import SeriesInfo, report_text
from aiworker.results.seg import SegError, build_seg
from aiworker.results.sr import SRError, build_sr
from aiworker.store.layout import ResultFolder
from aiworker.store.spool import fsync_path

log = logging.getLogger(__name__)


@dataclass
class ResultFiles:
    """The written objects, seconds spent building each kind, and the header warnings
    (``attribute``, ``problem``, ``action``, ``text``; never a value) also written to
    ``warnings``' file, :data:`~aiworker.store.layout.WARNINGS_FILE`."""

    seg: Path | None  # None: withheld by the quality gate
    sr: Path
    report: Path
    hl7: Path
    preview: Path
    sc: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[dict[str, str]] = field(default_factory=list)
    warnings_file: Path | None = None


def write_results(folder: Path, source_paths: Sequence[Path | str], loaded: LoadedSeries,
                  labels: np.ndarray, findings: dict[str, Any], manifest: Manifest,
                  model_id: str, hl7_settings: Hl7Settings | Mapping[str, Any] | None = None,
                  secondary_capture: bool = False) -> ResultFiles:
    """Build and write the SEG, SR, report, ORU^R01 and preview of one run on the series
    ``loaded`` (read from ``source_paths``) into ``folder``; the Secondary Capture too when
    ``secondary_capture``."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = [pydicom.dcmread(path) for path in source_paths]
    patient = read_patient_study(raw[0])
    datasets = [sanitized_source(ds, patient) for ds in raw]
    for warning in patient.warnings:
        log.warning("series %s: source header %s", loaded.series_uid, warning.text)
    timings: dict[str, float] = {}
    no_seg = gate.seg_withheld(findings) or manifest.outputs.segmentation is None
    seg = None if no_seg else _timed(
        timings, "seg", lambda: build_seg(datasets, loaded, labels, manifest, model_id,
                                          patient=patient))
    sr = _timed(timings, "sr", lambda: build_sr(datasets, seg, findings, manifest, model_id,
                                                patient=patient))
    report = _timed(timings, "report", lambda: report_text(
        datasets[0], SeriesInfo.from_dataset(datasets[0]), findings, manifest,
        patient=patient))
    message = _timed(timings, "hl7", lambda: build_oru(
        datasets[0], findings, report, manifest, model_id, Hl7Settings.of(hl7_settings),
        patient=patient))
    started = time.perf_counter()
    k = preview_slice(labels, acl_label(manifest))
    image = render_preview(loaded, labels, manifest, slice_index=k)
    result = ResultFolder(folder)
    files = ResultFiles(None if seg is None else result.seg, result.sr, result.report,
                        result.hl7, result.preview,
                        timings=timings, warnings=patient.warning_dicts(),
                        warnings_file=result.warnings)
    _write(files.preview, lambda path: image.save(path, format="PNG"))
    if secondary_capture:
        source, frame = slice_source(datasets, loaded, k)
        sc = build_secondary_capture(source, image, model_id, loaded.series_uid,
                                     source_frame=frame, patient=patient)
        files.sc = result.sc
        _write(files.sc, lambda path: sc.save_as(path, enforce_file_format=True))
    timings["preview"] = round(time.perf_counter() - started, 4)
    if files.seg is not None:
        _write(files.seg, lambda path: seg.save_as(path, enforce_file_format=True))
    else:
        result.seg.unlink(missing_ok=True)  # a SEG an earlier run of the job wrote
    _write(files.sr, lambda path: sr.save_as(path, enforce_file_format=True))
    _write(files.report, lambda path: path.write_text(report, encoding="utf-8"))
    _write(files.hl7, lambda path: path.write_bytes(message.encode("utf-8")))
    _write(files.warnings_file, lambda path: path.write_text(
        json.dumps(files.warnings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))
    return files


def _timed(timings: dict[str, float], key: str, build: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = build()
    timings[key] = round(time.perf_counter() - started, 4)
    return value


def _write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` through a temporary name: written, fsynced, renamed."""
    partial = path.with_name(f".partial-{path.name}")
    write(partial)
    fsync_path(partial)
    os.replace(partial, path)


def write_job_objects(folder: Path, source_paths: Sequence[Path | str], loaded: LoadedSeries,
                      labels: np.ndarray, findings: dict[str, Any], manifest: Manifest,
                      model_id: str, options: Mapping[str, Any] | None = None
                      ) -> dict[str, float]:
    """The inference process's hook (``WorkerSettings.write_objects``): write a done job's
    result objects with :func:`write_results`; seconds per kind (``seg``, ``sr``, ``report``,
    ``hl7``, ``preview``); the header warnings are in the folder's
    :data:`~aiworker.store.layout.WARNINGS_FILE`.
    ``options`` are the job's pipeline's: ``hl7`` (the
    :class:`Hl7Settings` fields) and ``secondary_capture``. Labels or a source that cannot
    make them raise ``ValueError``, which fails the job as ``data``."""
    options = options or {}
    try:
        return write_results(folder, source_paths, loaded, labels, findings, manifest,
                             model_id, options.get("hl7"),
                             bool(options.get("secondary_capture"))).timings
    except (SegError, SRError, PreviewError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
