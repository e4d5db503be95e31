"""The dashboard's read model on top of :mod:`aiworker.store.status`: a study's stage told
per destination, its timeline without negative durations, and the search of the list.

:func:`study_json` gives a study its outbox rows; here they are summed up per destination
(``pacs: sent 2/2 · ris: retrying (3 attempts), next attempt 20:14:05``) and the study's
stage says whether its results are all out (``sent``), on their way (``sending``), out at
some destinations and given up at others (``partly_sent``), or nowhere (``failed``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiworker.store.db import StateDB
from aiworker.store.outbox import DEAD, SENT
from aiworker.store.status import study_stage

# The dashboard's stages, in flow order (status.STAGES plus the two of sending).
STAGES = ("receiving", "complete", "not_selected", "selected", "inferred", "sending",
          "partly_sent", "sent", "failed")


def destinations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per destination (in first-row order) of a study's outbox rows (``outbox_json``
    dicts): ``state`` (sent | sending | retrying | queued | dead), counts, the most
    attempts, the earliest next attempt of the rows still to go, the last error and a
    one-line ``summary``."""
    shown: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        shown.setdefault(row["destination"], []).append(row)
    return [_destination(name, group) for name, group in shown.items()]


def _destination(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    sent = sum(r["state"] == SENT for r in rows)
    dead = [r for r in rows if r["state"] == DEAD]
    waiting = [r for r in rows if r["state"] not in (SENT, DEAD)]
    attempts = max(r["attempts"] for r in rows)
    errors = [r["last_error"] for r in dead + waiting if r["last_error"]]
    upcoming = sorted(r["next_attempt_at"] for r in waiting
                      if r["state"] == "pending" and r["next_attempt_at"])
    if dead:
        state = DEAD
    elif not waiting:
        state = SENT
    elif any(r["state"] == "sending" for r in waiting):
        state = "sending"
    else:
        state = "retrying" if any(r["attempts"] for r in waiting) else "queued"
    summary = f"{name}: {state} {sent}/{len(rows)}" if state in (SENT, "sending", "queued") \
        else f"{name}: {state} ({attempts} attempt{'s' if attempts != 1 else ''})"
    if state == "retrying" and upcoming:
        summary += f", next attempt {_clock(upcoming[0])}"
    if state == DEAD and sent:
        summary += f", {sent}/{len(rows)} sent"
    return {"destination": name, "state": state, "sent": sent, "total": len(rows),
            "dead": len(dead), "attempts": attempts,
            "next_attempt_at": upcoming[0] if upcoming else None,
            "last_error": errors[0] if errors else None, "summary": summary}


def _clock(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%H:%M:%S")


def stage(study: dict[str, Any], per_destination: list[dict[str, Any]]) -> str:
    """The study's stage (:data:`STAGES`): :func:`status.study_stage`, except that once
    every job is done the outbox is read per destination, so a study whose PACS has
    everything is not shown as ``inferred`` or ``failed`` because of its RIS row."""
    base = study_stage(study)
    if base not in ("inferred", "sent", "failed") or not per_destination:
        return base
    if any(j["state"] == "failed" for d in study["selection"].values() for j in d["jobs"]
           if j["state"] != "superseded"):
        return "failed"
    states = {d["state"] for d in per_destination}
    if states == {SENT}:
        return "sent"
    if DEAD in states:
        return "partly_sent" if any(d["sent"] for d in per_destination) else "failed"
    return "sending"


def honest_timeline(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline with each step stamped before a step above it marked ``stale``: it
    happened before the study re-opened (late instances after completion), so it has no
    duration (it would be negative) and the next step counts from the latest real one."""
    latest: str | None = None
    for step in steps:
        at = step["at"]
        step["stale"] = bool(at and latest and _parse(at) < _parse(latest))
        if step["stale"]:
            step["seconds"] = None
        elif at:
            if latest and step["seconds"] is not None:
                step["seconds"] = _between(latest, at)
            latest = at
    return steps


def _parse(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _between(start: str, end: str) -> float:
    return round((_parse(end) - _parse(start)).total_seconds(), 3)


def studies_matching(db: StateDB, text: str) -> set[str]:
    """The study UIDs whose Study Instance UID starts with ``text`` or whose accession
    number is exactly ``text`` (the accession is matched, never returned)."""
    text = text.strip()
    if not text:
        return set()
    prefix = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = db.query("SELECT study_uid FROM studies WHERE study_uid LIKE ? ESCAPE '\\'"
                    " OR accession_number = ?", (prefix, text))
    return {row["study_uid"] for row in rows}
