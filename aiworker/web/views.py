"""What the pages and the API show, and what their buttons do, over the state DB.

Reading goes through :func:`aiworker.store.status.status_report` (the same shapes as
``aiworker status --json``), so the CLI, the API and the pages agree; patient name and ID
are added only with ``web.show_phi``. Re-queuing goes through the store's own functions
(:class:`~aiworker.store.outbox.Outbox`, :meth:`~aiworker.store.db.StateDB.retry_job`),
and each one done over HTTP adds an event saying who (the client address) asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiworker.config import Config
from aiworker.store import dashboard
from aiworker.store.db import StateDB
from aiworker.store.events import PROBLEM_EVENTS
from aiworker.store.jobs import JobError
from aiworker.store.layout import ResultFolder
from aiworker.store.outbox import DEAD, Outbox
from aiworker.store.states import FAILED
from aiworker.store.status import job_json, outbox_json, problem_json, status_report, worker_json
from aiworker.store.status import timeline as timeline_of


class NotFound(Exception):
    """The study, job or outbox row named does not exist."""


class Conflict(Exception):
    """The thing named exists but cannot be re-queued in its state."""


@dataclass
class Views:
    """The pages' and the API's access to one state DB."""

    db: StateDB
    config: Config

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.db)  # creates the outbox table once, if it is not there

    # --- reading -----------------------------------------------------------------------

    def studies(self, stage: str | None = None, limit: int = 200, search: str | None = None
                ) -> list[dict[str, Any]]:
        """Studies newest first (only those at ``stage`` when given, only those whose Study
        Instance UID starts with ``search`` or whose accession number is ``search``), each
        with its stage, destinations, timeline and ACL finding."""
        wanted = dashboard.studies_matching(self.db, search) if search else None
        shown = []
        for study in status_report(self.db, 0, phi=self.config.web.show_phi)["studies"]:
            if wanted is not None and study["study_uid"] not in wanted:
                continue
            self._annotate(study)
            if stage is None or study["stage"] == stage:
                shown.append(study)
            if len(shown) >= limit:
                break
        return shown

    def study(self, study_uid: str) -> dict[str, Any]:
        """One study with stage and timeline; each current job also has its ``report``
        text and whether it has a ``preview`` image. Raises :class:`NotFound`."""
        found = status_report(self.db, 0, study_uid, phi=self.config.web.show_phi)["studies"]
        if not found:
            raise NotFound(f"no study {study_uid}")
        study = self._annotate(found[0])
        for decision in study["selection"].values():
            for job in decision["jobs"]:
                folder = ResultFolder(Path(job["result_dir"])) if job["result_dir"] else None
                job["preview"] = bool(folder and folder.preview.is_file())
                job["report"] = _read_text(folder.report) if folder else None
        return study

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally of one state."""
        jobs = [job_json(j) | {"study_uid": j.study_uid, "pipeline": j.pipeline}
                for j in reversed(self.db.jobs())]
        return [j for j in jobs if state is None or j["state"] == state]

    def job(self, job_id: str) -> dict[str, Any]:
        """One job by its exact id. Raises :class:`NotFound`."""
        found = [j for j in self.jobs() if j["job_id"] == job_id]
        if not found:
            raise NotFound(f"no job {job_id}")
        return found[0]

    def result_file(self, job_id: str, name: str) -> Path:
        """A file of a job's result folder (``preview.png``, ``report.txt``). Raises
        :class:`NotFound` when the job or the file is not there."""
        folder = self.job(job_id)["result_dir"]
        path = Path(folder) / name if folder else None
        if path is None or not path.is_file():
            raise NotFound(f"job {job_id} has no {name}")
        return path

    def outbox_rows(self, state: str | None = None, destination: str | None = None
                    ) -> list[dict[str, Any]]:
        rows = self.outbox.rows(states=[state] if state else (), destination=destination)
        return [outbox_json(r) | {"study_uid": r.study_uid} for r in rows]

    def failures(self, limit: int = 200) -> dict[str, Any]:
        """Failed jobs, dead outbox rows and problem events (rejected associations, failed
        C-STOREs such as 0xA700, missing instances, ...), newest first."""
        return {"jobs": self.jobs(FAILED),
                "dead": list(reversed(self.outbox_rows(DEAD))),
                "events": [problem_json(e) for e in self.db.events(PROBLEM_EVENTS, limit)]}

    def workers(self) -> list[dict[str, Any]]:
        """The workers of a shared (PostgreSQL) state; none on SQLite."""
        return [worker_json(w) for w in self.db.workers()]

    def _annotate(self, study: dict[str, Any]) -> dict[str, Any]:
        """:func:`_annotate` plus the link to the study in the viewer (``web.viewer_url``)."""
        template = self.config.web.viewer_url
        study["viewer_url"] = template.replace("{study_uid}", quote(study["study_uid"])) \
            if template else None
        return _annotate(study)

    # --- re-queuing --------------------------------------------------------------------

    def resend_row(self, row_id: int, client: str) -> dict[str, Any]:
        """Queue one sent or dead outbox row again. Raises :class:`NotFound` or
        :class:`Conflict` (a row still pending or sending)."""
        rows = [r for r in self.outbox.rows() if r.id == row_id]
        if not rows:
            raise NotFound(f"no outbox row {row_id}")
        if not self.outbox.resend([row_id]):
            raise Conflict(f"outbox row {row_id} is {rows[0].state}: it is on its way already")
        row = rows[0]
        self.db.add_event("outbox_resent", row.study_uid, None, None, rows=[row_id],
                          destination=row.destination, source="web", client=client)
        return {"requeued": 1, "row": row_id}

    def resend_study(self, study_uid: str, client: str) -> dict[str, Any]:
        """Queue every sent or dead outbox row of a study again."""
        self.study(study_uid)
        count = self.outbox.resend_study(study_uid)
        self.db.add_event("outbox_resent", study_uid, None, None, rows="study", count=count,
                          source="web", client=client)
        return {"requeued": count, "study_uid": study_uid}

    def retry_job(self, job_id: str, client: str) -> dict[str, Any]:
        """Queue a failed job again. Raises :class:`NotFound` or :class:`Conflict`."""
        job = self.job(job_id)
        try:
            self.db.retry_job(job_id)
        except JobError as exc:
            raise Conflict(str(exc)) from exc
        self.db.add_event("job_retry_requested", job["study_uid"], job["series_uid"], None,
                          job_id=job_id, source="web", client=client)
        return {"requeued": 1, "job_id": job_id}


def _annotate(study: dict[str, Any]) -> dict[str, Any]:
    """Add the study's destinations, stage, timeline and the ACL decision of its latest
    done job."""
    study["destinations"] = dashboard.destinations(study["outbox"])
    study["stage"] = dashboard.stage(study, study["destinations"])
    study["timeline"] = dashboard.honest_timeline(timeline_of(study))
    study["acl"] = None
    for decision in study["selection"].values():
        for job in decision["jobs"]:
            acl = ((job["findings"] or {}).get("classification") or {}).get("acl")
            if job["state"] == "done" and acl:
                study["acl"] = {"decision": acl["decision"],
                                "probability": acl.get("probability")}
    return study


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None
