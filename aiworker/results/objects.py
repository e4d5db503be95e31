"""All result objects of one model run, written into one folder.

:func:`write_results` turns a run's labels and findings into the files that go to the PACS
and the RIS: ``seg.dcm`` (:mod:`~aiworker.results.seg`), ``sr.dcm``
(:mod:`~aiworker.results.sr`, referencing the SEG's segments), ``report.txt``
(:mod:`~aiworker.results.report`) and ``oru.hl7`` (:mod:`~aiworker.results.hl7`, carrying
the report). Each file is written under a temporary name, fsynced and renamed, so a crash
never leaves half an object under its real name. Their UIDs and the HL7 control id are
derived from the series and the model, so writing them again gives the same objects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from aiworker.infer.manifest import Manifest
from aiworker.infer.volume import LoadedSeries
from aiworker.results.hl7 import Hl7Settings, build_oru
from aiworker.results.report import SeriesInfo, report_text
from aiworker.results.seg import SegError, build_seg
from aiworker.results.sr import SRError, build_sr
from aiworker.store.spool import fsync_path

SEG_FILE, SR_FILE, REPORT_FILE, HL7_FILE = "seg.dcm", "sr.dcm", "report.txt", "oru.hl7"


@dataclass
class ResultFiles:
    """The written objects, and seconds spent building each kind."""

    seg: Path
    sr: Path
    report: Path
    hl7: Path
    timings: dict[str, float] = field(default_factory=dict)


def write_results(folder: Path, source_paths: Sequence[Path | str], loaded: LoadedSeries,
                  labels: np.ndarray, findings: dict[str, Any], manifest: Manifest,
                  model_id: str, hl7_settings: Hl7Settings | None = None) -> ResultFiles:
    """Build and write the SEG, SR, report and ORU^R01 of one run on the series ``loaded``
    (read from ``source_paths``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(path) for path in source_paths]
    timings: dict[str, float] = {}
    seg = _timed(timings, "seg", lambda: build_seg(datasets, loaded, labels, manifest, model_id))
    sr = _timed(timings, "sr", lambda: build_sr(datasets, seg, findings, manifest, model_id))
    report = _timed(timings, "report", lambda: report_text(
        datasets[0], SeriesInfo.from_dataset(datasets[0]), findings, manifest))
    message = _timed(timings, "hl7", lambda: build_oru(datasets[0], findings, report, manifest,
                                                       model_id, hl7_settings))
    files = ResultFiles(folder / SEG_FILE, folder / SR_FILE, folder / REPORT_FILE,
                        folder / HL7_FILE, timings)
    _write(files.seg, lambda path: seg.save_as(path, enforce_file_format=True))
    _write(files.sr, lambda path: sr.save_as(path, enforce_file_format=True))
    _write(files.report, lambda path: path.write_text(report, encoding="utf-8"))
    _write(files.hl7, lambda path: path.write_bytes(message.encode("utf-8")))
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
                      model_id: str) -> dict[str, float]:
    """The inference process's hook (``WorkerSettings.write_objects``): write a done job's
    result objects with :func:`write_results`; seconds per kind (``seg``, ``sr``, ``report``,
    ``hl7``). Labels or a source that cannot make them raise ``ValueError``, which fails
    the job as ``data``."""
    try:
        return write_results(folder, source_paths, loaded, labels, findings, manifest,
                             model_id).timings
    except (SegError, SRError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
