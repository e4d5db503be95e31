"""The JSON REST API under ``/api``: studies, series, jobs, outbox, failures; resend,
retry and a study's de-identified export (:mod:`.export`) as POSTs that need
``Authorization: Bearer <web.token>`` (see :mod:`.auth`).

Study, series, job and outbox objects have the shapes of ``aiworker status --json``; a
study adds ``stage`` (one of :data:`~aiworker.store.dashboard.STAGES`), ``destinations``,
``timeline``, ``acl`` and ``viewer_url``, and with ``web.show_phi`` a ``patient`` object.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse

from aiworker.export.deid import PROFILES
from aiworker.export.export import ExportError
from aiworker.store.dashboard import STAGES
from aiworker.store.layout import PREVIEW_FILE, REPORT_FILE
from aiworker.web.auth import require_token
from aiworker.web.export import BadProfile, NoExport, export_study
from aiworker.web.views import Conflict, NotFound, Views

router = APIRouter(prefix="/api", tags=["api"])

Stage = Literal[STAGES]  # type: ignore[valid-type]
JobState = Literal["queued", "running", "done", "failed", "superseded"]
RowState = Literal["pending", "sending", "sent", "dead"]


def views(request: Request) -> Views:
    return request.app.state.web.views


ViewsDep = Annotated[Views, Depends(views)]
Limit = Annotated[int, Query(ge=1, le=5000)]


def client(request: Request) -> str:
    """Who asked, for the event a re-queue leaves."""
    return request.client.host if request.client else "unknown"


def _found(call: Any, *args: Any) -> Any:
    """``call(*args)`` with the views' errors as HTTP 404 and 409."""
    try:
        return call(*args)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc


@router.get("/studies", summary="Studies, newest first")
def list_studies(v: ViewsDep, state: Stage | None = None, limit: Limit = 200,
                 q: Annotated[str | None, Query(max_length=128)] = None
                 ) -> list[dict[str, Any]]:
    """Each study with its series, decisions, jobs, outbox rows, ``destinations`` (the
    rows summed up per destination), ``stage`` and ``timeline`` (received, complete,
    selected, inferred, sent: when, and seconds since the step before; ``stale`` for a
    step from before the study re-opened). ``state`` keeps the studies at one stage;
    ``q`` those whose Study Instance UID starts with it or whose accession number is it
    (the accession number itself is shown only with ``web.show_phi``)."""
    return v.studies(state, limit, search=q)


@router.get("/studies/{study_uid}", summary="One study")
def get_study(study_uid: str, v: ViewsDep) -> dict[str, Any]:
    """The study as in the list, each job with its ``report`` text and ``preview`` flag."""
    return _found(v.study, study_uid)


@router.get("/studies/{study_uid}/series", summary="A study's series")
def get_series(study_uid: str, v: ViewsDep) -> list[dict[str, Any]]:
    """Each series with its counts, completion, derived features and selection verdicts."""
    return _found(v.study, study_uid)["series"]


@router.get("/jobs", summary="Inference jobs, newest first")
def list_jobs(v: ViewsDep, state: JobState | None = None) -> list[dict[str, Any]]:
    return v.jobs(state)


@router.get("/jobs/{job_id}", summary="One job")
def get_job(job_id: str, v: ViewsDep) -> dict[str, Any]:
    return _found(v.job, job_id)


@router.get("/jobs/{job_id}/preview.png", summary="A job's preview image",
            response_class=FileResponse, responses={404: {"description": "no preview"}})
def get_preview(job_id: str, v: ViewsDep) -> FileResponse:
    """The slice through the most ACL with the labels overlaid (not for diagnostic use)."""
    return FileResponse(_found(v.result_file, job_id, PREVIEW_FILE), media_type="image/png")


@router.get("/jobs/{job_id}/report", summary="A job's text report",
            response_class=PlainTextResponse)
def get_report(job_id: str, v: ViewsDep) -> PlainTextResponse:
    path = _found(v.result_file, job_id, REPORT_FILE)
    return PlainTextResponse(path.read_text(encoding="utf-8"))


@router.get("/outbox", summary="Outbox rows, oldest first")
def list_outbox(v: ViewsDep, state: RowState | None = None,
                destination: str | None = None) -> list[dict[str, Any]]:
    return v.outbox_rows(state, destination)


@router.get("/workers", summary="The workers of a shared state")
def list_workers(v: ViewsDep) -> list[dict[str, Any]]:
    """Each ``aiworker worker`` (and ``serve`` on PostgreSQL): its queues, each model's
    device, and ``silent`` once it has not refreshed its row for a while (killed or cut
    off: its jobs go to another worker). Empty on SQLite."""
    return v.workers()


@router.get("/failures", summary="Failed jobs, dead outbox rows, problem events")
def get_failures(v: ViewsDep, limit: Limit = 200
                 ) -> dict[str, Any]:
    """Problem events are rejected associations, failed C-STOREs (``status`` 0xA700 when
    the disk was below ``storage.min_free_mb``), missing instances, failed jobs, ..."""
    return v.failures(limit)


@router.post("/outbox/{row_id}/resend", summary="Send one outbox row again",
             dependencies=[Depends(require_token)],
             responses={401: {"description": "no or wrong token"},
                        403: {"description": "web.token not set"},
                        409: {"description": "the row is pending or sending"}})
def resend_row(row_id: int, request: Request, v: ViewsDep) -> dict[str, Any]:
    """A sent or dead row becomes pending with a fresh retry window; the node sends it."""
    return _found(v.resend_row, row_id, client(request))


@router.post("/studies/{study_uid}/resend", summary="Send a study's results again",
             dependencies=[Depends(require_token)])
def resend_study(study_uid: str, request: Request, v: ViewsDep
                 ) -> dict[str, Any]:
    """Every sent or dead outbox row of the study becomes pending again."""
    return _found(v.resend_study, study_uid, client(request))


@router.post("/jobs/{job_id}/retry", summary="Run a failed job again",
             dependencies=[Depends(require_token)],
             responses={409: {"description": "the job is not failed"}})
def retry_job(job_id: str, request: Request, v: ViewsDep) -> dict[str, Any]:
    return _found(v.retry_job, job_id, client(request))


@router.post("/studies/{study_uid}/export", summary="Export a study de-identified, on the node",
             dependencies=[Depends(require_token)],
             responses={404: {"description": "the study has no done job"},
                        422: {"description": "unknown profile"}})
def export_study_api(study_uid: str, request: Request, profile: Annotated[str, Query(
        description=f"one of {', '.join(PROFILES)}")] = "basic") -> dict[str, Any]:
    """The study's source series and the node's SEG, SR and SC, de-identified per DICOM
    PS3.15 with ``profile`` into the node's ``exports/`` folder, the mapping beside it; the
    answer is the export's report (folder, files, options, burned-in annotation, mapping)."""
    try:
        return export_study(request, study_uid, profile).as_dict()
    except BadProfile as exc:
        raise HTTPException(422, str(exc)) from exc
    except (NoExport, ExportError) as exc:
        raise HTTPException(404, str(exc)) from exc
