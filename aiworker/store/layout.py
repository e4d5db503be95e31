"""Where the node keeps its files under ``storage.data_dir``, and the names of the files in
a job's result folder: the one place they are defined.

A job's folder, ``results/<job_id>/``, is written by the inference run (the labels and the
findings) and the results stage (the objects and their warnings), read by the outbox (the
objects it sends), the dashboard (preview, report) and retention (which removes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.nii.gz"    # the label map on the first input series' geometry
FINDINGS_FILE = "findings.json"  # volumes, classifications (and, offline, what ran)
SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
REPORT_FILE = "report.txt"
HL7_FILE = "oru.hl7"
PREVIEW_FILE = "preview.png"
SC_FILE = "sc.dcm"               # the preview as a Secondary Capture, when configured
WARNINGS_FILE = "warnings.json"  # source header values the objects do not carry as they were
TIMINGS_FILE = "timings.json"    # written by ``aiworker infer`` (a node job's are in the DB)


@dataclass(frozen=True)
class DataPaths:
    """The data dir's layout: ``spool/``, ``state.db``, ``quarantine/``, ``results/``."""

    root: Path

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def result_folder(self, job_id: str) -> ResultFolder:
        return ResultFolder(self.results / job_id)


@dataclass(frozen=True)
class ResultFolder:
    """One job's result folder and its files by what they hold."""

    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def labels(self) -> Path:
        return self.path / LABELS_FILE

    @property
    def findings(self) -> Path:
        return self.path / FINDINGS_FILE

    @property
    def seg(self) -> Path:
        return self.path / SEG_FILE

    @property
    def sr(self) -> Path:
        return self.path / SR_FILE

    @property
    def report(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def hl7(self) -> Path:
        return self.path / HL7_FILE

    @property
    def preview(self) -> Path:
        return self.path / PREVIEW_FILE

    @property
    def sc(self) -> Path:
        return self.path / SC_FILE

    @property
    def warnings(self) -> Path:
        return self.path / WARNINGS_FILE

    @property
    def timings(self) -> Path:
        return self.path / TIMINGS_FILE

    def header_warnings(self) -> list[dict[str, Any]]:
        """The warnings the results stage recorded (none when it has not run or wrote none)."""
        try:
            return list(json.loads(self.warnings.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return []
