"""What the node holds, as plain JSON-ready dicts: the one source of ``aiworker status
--json`` and of the dashboard's REST API (:mod:`aiworker.web`).

Each study carries its series (with the selection's verdicts and derived features), each
pipeline's decision with its jobs, and its outbox rows; each problem event its kind, caller,
DIMSE status and reason. Times are ISO 8601 in UTC. The shapes are documented in the README
and kept stable: tools parse them. No patient name or ID appears here; a caller that may
show them (``web.show_phi``) reads them from the study rows itself.

:func:`study_stage` and :func:`timeline` say how far a study got along the flow received ->
complete -> selected -> inferred -> sent, for the dashboard and its filter.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiworker.store.db import StateDB
from aiworker.store.events import PROBLEM_EVENTS
from aiworker.store.jobs import Job
from aiworker.store.outbox import DEAD, SENT, Outbox, OutboxRow
from aiworker.store.workers import SILENT_AFTER_S

# How far a study got, in flow order; "failed" and "not_selected" end a study's flow early.
STAGES = ("receiving", "complete", "not_selected", "selected", "inferred", "sent", "failed")
TIMELINE_STEPS = ("received", "complete", "selected", "inferred", "sent")


def status_report(db: StateDB, problems: int = 10, study_uid: str | None = None,
                  phi: bool = False) -> dict[str, Any]:
    """Every study (or only ``study_uid``), newest first, and the ``problems`` newest
    problem events: the ``aiworker status --json`` document. With ``phi`` each study also
    has ``patient``: name, ID, accession number and study date."""
    studies = db.studies(study_uid)
    selections = db.selections(study_uid)
    jobs = db.jobs(study_uid)
    outbox = Outbox(db).rows(study_uid=study_uid)
    recent = db.events(PROBLEM_EVENTS, limit=problems) if problems > 0 else []
    shown = [study_json(s, selections, jobs, outbox) for s in studies]
    if phi:
        for study, row in zip(shown, studies, strict=True):
            study["patient"] = {"name": row["patient_name"], "id": row["patient_id"],
                                "accession_number": row["accession_number"],
                                "study_date": row["study_date"]}
    return {"studies": shown, "problems": [problem_json(e) for e in recent],
            "workers": [worker_json(w) for w in db.workers()]}


def worker_json(worker: dict[str, Any]) -> dict[str, Any]:
    """The stable ``status --json`` shape of one worker of a shared state."""
    return {"worker": worker["worker"], "queues": worker["queues"],
            "devices": worker["devices"], "started_at": when(worker["started_at"]),
            "seen_s": worker["seen_s"], "silent": worker["seen_s"] > SILENT_AFTER_S}


def when(epoch: float | None) -> str | None:
    """An epoch time as ISO 8601 in UTC (None stays None)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def outbox_json(row: OutboxRow) -> dict[str, Any]:
    """The stable ``status --json`` shape of one outbox row (documented in the README)."""
    return {"id": row.id, "job_id": row.job_id, "destination": row.destination,
            "kind": row.kind, "object_kind": row.object_kind,
            "sop_instance_uid": row.sop_instance_uid, "state": row.state,
            "attempts": row.attempts, "last_error": row.last_error,
            "next_attempt_at": when(row.next_attempt_at), "sent_at": when(row.sent_at)}


def problem_json(event: dict[str, Any]) -> dict[str, Any]:
    """The stable ``status --json`` shape of one problem event (documented in the README)."""
    detail = event["detail"]
    return {
        "at": when(event["at"]),
        "kind": event["kind"],
        "calling_ae": detail.get("calling_ae"),
        "status": detail.get("status"),
        "reason": detail.get("reason"),
        "study_uid": event["study_uid"],
        "series_uid": event["series_uid"],
        "sop_uid": event["sop_uid"],
        "detail": detail,
    }


def study_json(study: dict[str, Any], selections: list[dict[str, Any]],
               jobs: list[Job], outbox: list[OutboxRow]) -> dict[str, Any]:
    """The stable ``status --json`` shape of one study (documented in the README)."""
    decisions = {d["pipeline"]: d for d in selections if d["study_uid"] == study["study_uid"]}
    verdicts, features = series_explanations(decisions.values())
    return {
        "study_uid": study["study_uid"],
        "state": study["state"],
        "calling_ae": study["calling_ae"],
        "description": study["study_description"],
        "first_received": when(study["first_received"]),
        "last_received": when(study["last_received"]),
        "completed_at": when(study["completed_at"]),
        "instances": sum(s["instance_count"] for s in study["series"]),
        "series": [
            {
                "series_uid": s["series_uid"],
                "series_number": s["series_number"],
                "modality": s["modality"],
                "description": s["series_description"],
                "sop_class_uid": s["sop_class_uid"],
                "instances": s["instance_count"],
                "frames": s["frame_count"],
                "bytes": s["bytes"],
                "expected_frames": s["expected_frames"],
                "state": s["state"],
                "closed_by": s["closed_by"],
                "first_received": when(s["first_received"]),
                "last_received": when(s["last_received"]),
                "completed_at": when(s["completed_at"]),
                "features": features.get(s["series_uid"]),
                "selection": verdicts.get(s["series_uid"], {}),
            }
            for s in study["series"]
        ],
        "selection": {
            pipeline: selection_json(decision, [j for j in jobs if j.pipeline == pipeline
                                                and j.study_uid == study["study_uid"]])
            for pipeline, decision in sorted(decisions.items())
        },
        "outbox": [outbox_json(r) for r in outbox if r.study_uid == study["study_uid"]],
    }


def series_explanations(decisions: Iterable[dict[str, Any]]
                        ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Series UID -> its verdicts (``pipeline/role`` -> matched, reason), and -> its
    features, from the stored decisions of a study."""
    verdicts: dict[str, dict] = {}
    features: dict[str, dict] = {}
    for decision in decisions:
        for series in decision["explanation"].get("series", []):
            verdicts.setdefault(series["series_uid"], {}).update(series["verdicts"])
            features[series["series_uid"]] = series["features"]
    return verdicts, features


def selection_json(decision: dict[str, Any], jobs: list[Job]) -> dict[str, Any]:
    """The stable ``status --json`` shape of one pipeline's decision on a study."""
    explanation = decision["explanation"]
    return {
        "decided_at": when(decision["decided_at"]),
        "matched": decision["matched"],
        "chosen": explanation.get("chosen", {}),
        "reason": explanation.get("reason"),
        "rules": explanation.get("rules"),
        "jobs": [job_json(j) for j in jobs],
    }


def job_json(job: Job) -> dict[str, Any]:
    """The stable ``status --json`` shape of one job (the same keys, in the same order, as
    when jobs were dicts of their row)."""
    return {"job_id": job.job_id, "job_key": job.job_key, "state": job.state,
            "model": job.model, "series_uid": job.series_uid, "inputs": job.inputs,
            "created_at": when(job.created_at), "updated_at": when(job.updated_at),
            "started_at": when(job.started_at), "finished_at": when(job.finished_at),
            "attempts": job.attempts, "device": job.device, "timings": job.timings,
            "findings": job.findings, "error_kind": job.error_kind, "error": job.error,
            "result_dir": job.result_dir, "warnings": job.warnings, "worker": job.worker}


# --- how far a study got --------------------------------------------------------------


def _current_jobs(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's jobs that a decision still wants (not superseded)."""
    return [j for d in study["selection"].values() for j in d["jobs"]
            if j["state"] != "superseded"]


def study_stage(study: dict[str, Any]) -> str:
    """Where a study (a :func:`study_json` dict) stands, one of :data:`STAGES`: ``failed``
    when a job failed or an outbox row is dead; ``sent`` when every current job is done and
    every outbox row sent; ``inferred`` when every job is done; ``selected`` when a job is
    queued or running; ``not_selected`` when every pipeline decided against it."""
    if study["state"] != "complete":
        return "receiving"
    jobs = _current_jobs(study)
    if any(j["state"] == "failed" for j in jobs) or any(r["state"] == DEAD
                                                        for r in study["outbox"]):
        return "failed"
    if not study["selection"]:
        return "complete"
    if not jobs:
        return "not_selected"
    if any(j["state"] != "done" for j in jobs):
        return "selected"
    rows = study["outbox"]
    return "sent" if rows and all(r["state"] == SENT for r in rows) else "inferred"


def timeline(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's steps (:data:`TIMELINE_STEPS`), each with when it happened (ISO 8601 or
    None) and the seconds since the step before (None when either is missing).

    received: the first instance; complete: the study completed (nothing arrived for
    ``completion.series_stable_seconds``); selected: the latest decision; inferred: the
    last current job finished (done); sent: the last outbox row was accepted, once every
    row is sent.
    """
    jobs = _current_jobs(study)
    decided = [d["decided_at"] for d in study["selection"].values()]
    finished = [j["finished_at"] for j in jobs]
    rows = study["outbox"]
    stamps = {
        "received": study["first_received"],
        "complete": study["completed_at"],
        "selected": max(decided) if decided else None,
        "inferred": max(finished) if jobs and all(j["state"] == "done" for j in jobs)
        else None,
        "sent": max(r["sent_at"] for r in rows) if rows and all(
            r["state"] == SENT for r in rows) else None,
    }
    steps, before = [], None
    for name in TIMELINE_STEPS:
        at = stamps[name]
        steps.append({"step": name, "at": at, "seconds": _seconds(before, at)})
        before = at
    return steps


def _seconds(start: str | None, end: str | None) -> float | None:
    """Seconds from one ISO time to another (None when either is missing)."""
    if start is None or end is None:
        return None
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return round(delta.total_seconds(), 3)
