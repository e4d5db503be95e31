"""The dashboard's pages, rendered on the server from Jinja2 templates (no script build).

``/`` studies (newest first, filter by stage, search by Study Instance UID or accession
number, each with its timeline and destinations); ``/studies/{uid}``
one study (series table with the selection's verdicts, the decision, findings, text
report, preview image, outbox rows with resend buttons, the research export's button);
``/failures`` failed jobs, dead outbox rows and problem events; ``/outbox`` every outbox
row, by state and destination; ``/login`` the form that sets the session cookie
(``web.auth: token``). The list, a study and the outbox reload themselves every
``web.refresh_s`` (the header's box turns it off for the browser). The buttons post a
form with the operator's token (:mod:`.auth`) and come back to the page with a notice of
what happened (the export's downloads its zip instead).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.background import BackgroundTask

from aiworker.export.export import ExportError
from aiworker.store.dashboard import STAGES
from aiworker.web.api import client
from aiworker.web.auth import (
    COOKIE,
    TokenRefused,
    check_token,
    safe_next,
    session_value,
    via_https,
)
from aiworker.web.export import BadProfile, NoExport, export_study, zipped
from aiworker.web.views import Conflict, NotFound, Views

router = APIRouter(include_in_schema=False)

# What a button's outcome (a fixed code in the redirect) says on the page.
NOTICES = {
    "resent": "Queued again: the node sends it within a few seconds.",
    "retried": "The job is queued again: the node runs it next.",
    "disabled": "Resend and retry are off on this node: set web.token in its config "
                "(or use `aiworker resend` / `aiworker retry` on the node).",
    "missing": "Enter the node's token (web.token) to resend, retry or export.",
    "wrong": "Wrong token: nothing was queued or exported.",
    "conflict": "Nothing to do: it is on its way already (pending or sending), or not failed.",
    "notfound": "Not found: it may have been removed.",
    "noexport": "Nothing exported: the study has no done job (or the profile is unknown).",
}


def templates() -> Jinja2Templates:
    """The page templates, with the filters they use."""
    env = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
    env.env.filters.update(when=_when, seconds=_seconds, short=_short)
    env.env.globals.update(stages=STAGES)
    return env


def _when(iso: str | None) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM:SS' UTC ('' for None)."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    """A duration in words: '850 ms', '4.2 s', '3 min 5 s', '2 h 4 min'."""
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def _short(uid: str | None, keep: int = 12) -> str:
    """The end of a long UID (the full one goes in a title attribute)."""
    if not uid:
        return ""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def _page(request: Request, name: str, **context: Any) -> HTMLResponse:
    web = request.app.state.web
    notice = request.query_params.get("notice")
    return web.templates.TemplateResponse(request, name, {
        "show_phi": web.config.web.show_phi, "token_set": web.config.web.token is not None,
        "refresh_s": 0, "auth": web.config.web.auth,
        "reader": getattr(request.state, "reader", None),
        "notice": NOTICES.get(notice or ""), "notice_ok": notice in ("resent", "retried"),
        **context})


def _views(request: Request) -> Views:
    return request.app.state.web.views


def _refresh(request: Request) -> int:
    return request.app.state.web.config.web.refresh_s


@router.get("/", response_class=HTMLResponse)
def studies_page(request: Request, state: str | None = None, q: str | None = None
                 ) -> HTMLResponse:
    stage = state if state in STAGES else None
    search = (q or "").strip()[:128] or None
    return _page(request, "studies.html", studies=_views(request).studies(stage, search=search),
                 state=stage, q=search, refresh_s=_refresh(request))


@router.get("/outbox", response_class=HTMLResponse)
def outbox_page(request: Request, state: str | None = None, destination: str | None = None
                ) -> HTMLResponse:
    rows = _views(request).outbox_rows()
    names = sorted({r["destination"] for r in rows})
    shown = [r for r in reversed(rows) if (not state or r["state"] == state)
             and (not destination or r["destination"] == destination)]
    return _page(request, "outbox.html", rows=shown, state=state or None,
                 destination=destination or None, destinations=names,
                 row_states=("pending", "sending", "sent", "dead"),
                 refresh_s=_refresh(request))


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/", failed: int = 0) -> HTMLResponse:
    return _page(request, "login.html", next=safe_next(next), failed=bool(failed))


@router.post("/login")
def login(request: Request, token: str = Form(""), next: str = Form("/")
          ) -> RedirectResponse:
    """Check the token and set the session cookie (HttpOnly, SameSite=Strict)."""
    configured = request.app.state.web.config.web.token
    target = safe_next(next)
    try:
        check_token(configured, token)
    except TokenRefused:
        return RedirectResponse(f"/login?failed=1&next={quote(target)}", status_code=303)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, session_value(configured), httponly=True, samesite="strict",
                        secure=via_https(request), path="/")
    return response


@router.post("/logout")
def logout() -> RedirectResponse:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str) -> HTMLResponse:
    try:
        study = _views(request).study(study_uid)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    return _page(request, "study.html", study=study, refresh_s=_refresh(request))


@router.get("/workers", response_class=HTMLResponse)
def workers_page(request: Request) -> HTMLResponse:
    return _page(request, "workers.html", workers=_views(request).workers(),
                 shared=_views(request).db.shared, refresh_s=_refresh(request))


@router.get("/failures", response_class=HTMLResponse)
def failures_page(request: Request) -> HTMLResponse:
    return _page(request, "failures.html", failures=_views(request).failures())


def _act(request: Request, token: str, back: str, done: str, action: Any, *args: Any
         ) -> RedirectResponse:
    """Check the form's token, run ``action``, and go back to ``back`` with a notice."""
    try:
        check_token(request.app.state.web.config.web.token, token)
        action(*args, client(request))
        notice = done
    except TokenRefused as refused:
        notice = refused.code
    except Conflict:
        notice = "conflict"
    except NotFound:
        notice = "notfound"
    return RedirectResponse(f"{back}?notice={notice}", status_code=303)


@router.post("/studies/{study_uid}/outbox/{row_id}/resend")
def resend_row_form(request: Request, study_uid: str, row_id: int, token: str = Form("")
                    ) -> RedirectResponse:
    return _act(request, token, f"/studies/{quote(study_uid)}", "resent",
                _views(request).resend_row, row_id)


@router.post("/studies/{study_uid}/resend")
def resend_study_form(request: Request, study_uid: str, token: str = Form("")
                      ) -> RedirectResponse:
    return _act(request, token, f"/studies/{quote(study_uid)}", "resent",
                _views(request).resend_study, study_uid)


@router.post("/failures/outbox/{row_id}/resend")
def resend_dead_form(request: Request, row_id: int, token: str = Form("")) -> RedirectResponse:
    return _act(request, token, "/failures", "resent", _views(request).resend_row, row_id)


@router.post("/outbox/{row_id}/resend")
def resend_outbox_form(request: Request, row_id: int, token: str = Form("")
                       ) -> RedirectResponse:
    return _act(request, token, "/outbox", "resent", _views(request).resend_row, row_id)


@router.post("/failures/jobs/{job_id}/retry")
def retry_job_form(request: Request, job_id: str, token: str = Form("")) -> RedirectResponse:
    return _act(request, token, "/failures", "retried", _views(request).retry_job, job_id)


@router.post("/studies/{study_uid}/export", response_model=None)
def export_form(request: Request, study_uid: str, token: str = Form(""),
                profile: str = Form("basic")) -> FileResponse | RedirectResponse:
    """The study page's export button: the de-identified export as a zip download (made
    in the node's ``exports/``, :mod:`.export`), or back to the page saying why not."""
    back = f"/studies/{quote(study_uid)}"
    try:
        check_token(request.app.state.web.config.web.token, token)
        report = export_study(request, study_uid, profile)
    except TokenRefused as refused:
        return RedirectResponse(f"{back}?notice={refused.code}", status_code=303)
    except (BadProfile, NoExport, ExportError):
        return RedirectResponse(f"{back}?notice=noexport", status_code=303)
    archive = zipped(Path(report.out_dir))
    return FileResponse(archive, media_type="application/zip",
                        filename=f"{Path(report.out_dir).name}.zip",
                        background=BackgroundTask(archive.unlink, missing_ok=True))
