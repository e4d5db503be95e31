"""The research export from the web: a study's de-identified export (:mod:`aiworker.export`)
made on the node, behind ``web.token`` like resend and retry (:mod:`.auth`).

``POST /api/studies/{uid}/export`` (:mod:`.api`, ``Authorization: Bearer <web.token>``)
writes the export to ``<data_dir>/exports/<UTC time>-<study>-<random>/`` with its mapping
beside it and answers the export's report. The study page's button (:mod:`.pages`) posts
the same as a form with the operator's token and downloads the export as a zip
(:func:`zipped`); the mapping stays on the node (mode 0600, outside the zip), where only
the node's administrator reads it.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from fastapi import Request

from aiworker.export.deid import PROFILES, Options
from aiworker.export.export import (
    ExportReport,
    default_mapping_path,
    export_studies,
    node_export_dir,
)
from aiworker.store.states import DONE


class NoExport(Exception):
    """The study has no done job: nothing of it to export."""


class BadProfile(ValueError):
    """A profile that :data:`~aiworker.export.deid.PROFILES` does not name."""


def export_study(request: Request, study_uid: str, profile: str) -> ExportReport:
    """The study's export under the node's ``exports/`` folder, its mapping beside it
    (raises :class:`BadProfile`, :class:`NoExport`, or the export's
    :class:`~aiworker.export.export.ExportError`)."""
    web = request.app.state.web
    if profile not in PROFILES:
        raise BadProfile(f"unknown profile {profile!r}: use {', '.join(PROFILES)}")
    if not any(job.state == DONE for job in web.db.jobs(study_uid)):
        raise NoExport(f"study {study_uid} has no done job: nothing to export")
    out_dir = node_export_dir(web.config.storage.data_dir, study_uid)
    return export_studies(web.db, [study_uid], out_dir, Options.of(profile), profile,
                          default_mapping_path(out_dir))


def zipped(folder: Path) -> Path:
    """``folder``'s files as a zip in a temporary file (the caller removes it once sent)."""
    with tempfile.NamedTemporaryFile(suffix=".zip", prefix="aiworker-export-",
                                     delete=False) as handle:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(folder))
    return Path(handle.name)
