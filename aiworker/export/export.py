"""A de-identified research export of studies the node ran: what goes in, where it goes,
and the mapping that leads back.

For each study, every done job's input series (the instances in the spool the model read)
and its result objects (``seg.dcm``, ``sr.dcm``, ``sc.dcm`` from the job's result folder)
are de-identified together by one :class:`~aiworker.export.deid.Deidentifier`, so UIDs and
pseudonyms agree across the whole export, and written to::

    DIR/<new StudyInstanceUID>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm

The mapping (original -> new UIDs, patient ID -> pseudonym, the date shift's seed) goes to
a separate file, mode 0600, never inside ``DIR`` (the folder that is shared): by default
``DIR.parent/<DIR name>-mapping.json``; ``mapping=None`` writes none.

One export draws a fresh random seed, so two exports of the same study share nothing. An
export given an earlier mapping's seed (:func:`mapping_seed`) maps the same source to the
same UIDs, pseudonyms and date shift: a resend after a partial failure adds no duplicates
at the receiver, and a study exported later joins its patient's earlier ones.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom

from aiworker.export.deid import Deidentifier, Options
from aiworker.store.db import StateDB
from aiworker.store.layout import ResultFolder
from aiworker.store.states import DONE

RESULT_FILES = ("seg", "sr", "sc")  # the DICOM objects of a job's result folder


class ExportError(Exception):
    """An export that cannot be made (nothing to export, a mapping inside the export)."""


@dataclass(frozen=True)
class StudyFiles:
    """One study's files to export: the source instances and the node's result objects
    (kind -> path: ``seg``, ``sr``, ``sc``)."""

    study_uid: str
    sources: tuple[Path, ...]
    results: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class ExportRequest:
    """What to export, how, and where. ``mapping``: the mapping file, None for none;
    ``seed``: an earlier export's (:func:`mapping_seed`), None for a fresh one."""

    studies: tuple[StudyFiles, ...]
    out_dir: Path
    options: Options
    profile: str = "basic"
    mapping: Path | None = None
    seed: str | None = None


@dataclass
class ExportReport:
    """What an export wrote: files, the profile and options applied, files whose pixels
    carry burned-in annotation (to check before sharing), and where the mapping is."""

    out_dir: str
    profile: str
    options: list[str]
    studies: int = 0
    files: list[str] = field(default_factory=list)
    burned_in: list[dict[str, str]] = field(default_factory=list)
    mapping: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def default_mapping_path(out_dir: Path) -> Path:
    """Beside the export folder, never in it: ``DIR.parent/<DIR name>-mapping.json``."""
    out_dir = out_dir.resolve()
    return out_dir.parent / f"{out_dir.name}-mapping.json"


def node_export_dir(data_dir: Path, label: str, now: float | None = None) -> Path:
    """A new export's folder on the node: ``<data_dir>/exports/<UTC time>-<label>-<random>``
    (the dashboard's exports, and the staging folder of one sent to a destination)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in label)[-40:]
    return Path(data_dir).resolve() / "exports" / f"{stamp}-{safe}-{secrets.token_hex(3)}"


def mapping_seed(path: Path) -> str:
    """The seed an earlier export's mapping file records."""
    try:
        seed = json.loads(path.read_text(encoding="utf-8"))["seed"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path} is not an export's mapping file (no seed in it): "
                          f"{exc.__class__.__name__}") from exc
    if not isinstance(seed, str) or not seed:
        raise ExportError(f"{path} is not an export's mapping file (no seed in it)")
    return seed


def study_files(db: StateDB, study_uid: str) -> StudyFiles:
    """A study's done jobs' input series and result objects, from the state DB."""
    sources: dict[Path, None] = {}
    results: list[tuple[str, Path]] = []
    for job in db.jobs(study_uid):
        if job.state != DONE or not job.result_dir:
            continue
        for series_uid in job.inputs.values():
            sources.update(dict.fromkeys(Path(p) for p in db.series_instance_paths(series_uid)))
        folder = ResultFolder(Path(job.result_dir))
        results += [(kind, getattr(folder, kind)) for kind in RESULT_FILES
                    if getattr(folder, kind).is_file()]
    return StudyFiles(study_uid, tuple(sources), tuple(results))


def studies_since(db: StateDB, seconds: float, now: float | None = None) -> list[str]:
    """Studies with a job that finished within the last ``seconds``."""
    cutoff = (time.time() if now is None else now) - seconds
    return sorted({j.study_uid for j in db.jobs()
                   if j.state == DONE and (j.finished_at or 0) >= cutoff})


def export(request: ExportRequest) -> ExportReport:
    """De-identify and write the request's studies; write the mapping file unless
    ``request.mapping`` is None."""
    out_dir = request.out_dir.resolve()
    if request.mapping is not None and request.mapping.resolve().is_relative_to(out_dir):
        raise ExportError(f"the mapping file {request.mapping} would be inside the export "
                          f"folder {out_dir}, which is meant to be shared")
    if not any(s.sources or s.results for s in request.studies):
        raise ExportError("nothing to export: no done job with input series or results")
    deid = Deidentifier(request.options, seed=request.seed or secrets.token_hex(16))
    report = ExportReport(str(out_dir), request.profile, list(request.options.names),
                          studies=len(request.studies))
    for study in request.studies:
        for path, kind in [(p, "source") for p in study.sources] + [
                (p, k) for k, p in study.results]:
            ds = pydicom.dcmread(path)
            burned = ds.get("BurnedInAnnotation", "YES" if kind == "sc" else "NO")
            deid.apply(ds, own_sr=kind == "sr")
            written = _write(ds, out_dir)
            report.files.append(str(written.relative_to(out_dir)))
            if burned != "NO":
                report.burned_in.append({"file": str(written.relative_to(out_dir)),
                                         "kind": kind, "burned_in_annotation": str(burned)})
    if request.mapping is not None:
        _write_mapping(request.mapping, deid, request)
        report.mapping = str(request.mapping.resolve())
    return report


def _write(ds: pydicom.Dataset, out_dir: Path) -> Path:
    """``ds`` under its new study, series and SOP Instance UIDs."""
    folder = out_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_mapping(path: Path, deid: Deidentifier, request: ExportRequest) -> None:
    """The way back, readable by its owner only (0600, created so, never widened)."""
    body = {"profile": request.profile, "options": list(request.options.names),
            "seed": deid.seed, "patients": deid.pseudonyms, "uids": deid.uid_map,
            "export_dir": str(request.out_dir.resolve()),
            "studies": [s.study_uid for s in request.studies]}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{path.name}")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(body, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def export_studies(db: StateDB, study_uids: Sequence[str], out_dir: Path, options: Options,
                   profile: str, mapping: Path | None, seed: str | None = None
                   ) -> ExportReport:
    """:func:`export` of studies the state DB knows."""
    studies = tuple(study_files(db, uid) for uid in study_uids)
    return export(ExportRequest(studies, out_dir, options, profile, mapping, seed))
