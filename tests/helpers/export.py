"""A node data folder holding one processed study, for the export's CLI and dashboard
tests: a phantom series received into the state DB with the store's own calls (receive,
complete, select, a done job) and the job's result folder written by the node's own
result writer (SEG, SR, SC from the phantom's truth, as in tests/test_export.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from aiworker.results.objects import write_results
from aiworker.store.db import StateDB
from aiworker.store.jobs import NewJob
from aiworker.store.layout import DataPaths
from aiworker.store.records import InstanceRecord
from helpers.results import MANIFEST, MODEL_ID, truth_run


@dataclass(frozen=True)
class ProcessedStudy:
    """The study in the node's folder: its UID, the source files, and one source read."""

    study_uid: str
    series_uid: str
    sources: tuple[Path, ...]
    source: pydicom.Dataset
    job_id: str


def processed_study(data_dir: Path, seed: int = 5, matrix: int = 48) -> ProcessedStudy:
    """Receive a phantom's sagittal PD FS into ``data_dir`` and finish a knee job on it
    whose result folder holds the SEG, SR and SC."""
    paths = DataPaths(data_dir)
    run = truth_run(paths.spool / "phantom", seed=seed, matrix=matrix)
    db = StateDB(paths.db)
    try:
        now = time.time() - 60
        for path in run.paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            db.record_instance(InstanceRecord.from_dataset(
                ds, path=path, size=path.stat().st_size,
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="MODALITY",
                received_at=now))
        source = pydicom.dcmread(run.paths[0])
        db.complete_idle(now + 10, 1.0)
        [(uid, completed_at, _)] = [w for w in db.awaiting_selection(["knee"])
                                    if w[0] == source.StudyInstanceUID]
        series = str(source.SeriesInstanceUID)
        chosen = db.record_selection(uid, completed_at, "knee",
                                     {"chosen": {"main": series}, "series": []},
                                     NewJob("knee", MODEL_ID, uid, {"main": series}))
        claimed = db.claim_job()
        assert claimed is not None and claimed.job_id == chosen.job_id
        folder = paths.result_folder(chosen.job_id).path
        write_results(folder, run.paths, run.loaded, run.labels, run.findings, MANIFEST,
                      MODEL_ID, secondary_capture=True)
        db.finish_job(chosen.job_id, run.findings, {"total": 1.0}, "cpu", str(folder))
    finally:
        db.close()
    return ProcessedStudy(uid, series, tuple(run.paths), source, chosen.job_id)
