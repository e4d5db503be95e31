"""Selection decisions in the state DB, mixed into :class:`~aiworker.store.db.StateDB`.

``selections`` keeps, per study and pipeline, the latest decision (its JSON explanation)
and the completion it answered (``completed_at``); a study that re-opens and completes again
lacks a decision for its new completion and is selected again. A match queues its job
(:func:`~aiworker.store.jobs.queue_job`) in the same transaction; a queued job that a newer
decision no longer wants becomes ``superseded``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from aiworker.store.events import write_event
from aiworker.store.handoff import NoHandoff
from aiworker.store.jobs import NewJob, queue_job
from aiworker.store.states import COMPLETE, QUEUED, STORED, SUPERSEDED


@dataclass(frozen=True)
class SelectionRecord:
    """What recording a decision did."""

    job_id: str | None  # the job of a match (new or already there)
    job_created: bool  # False when the same job_key was queued before (a re-selection)
    superseded: list[str]  # queued jobs of the study and pipeline no longer wanted


class SelectionTable:
    """The selection methods of the state DB (which gives the transaction and the query)."""

    _transaction: Callable[[], AbstractContextManager[Any]]
    _query: Callable[..., list[Any]]
    handoff: NoHandoff

    def awaiting_selection(self, pipelines: list[str], study_uid: str | None = None
                           ) -> list[tuple[str, float, list[str]]]:
        """Complete studies (or only ``study_uid``) that lack a decision of some pipeline
        for their latest completion: (study UID, completed_at, the pipelines that owe one),
        oldest first."""
        waiting: dict[str, tuple[float, list[str]]] = {}
        only = "" if study_uid is None else " AND study_uid = ?"
        for pipeline in pipelines:
            rows = self._query(
                "SELECT study_uid, completed_at FROM studies s WHERE state = ?" + only +
                " AND NOT EXISTS (SELECT 1 FROM selections x WHERE x.study_uid = s.study_uid"
                " AND x.pipeline = ? AND x.completed_at = s.completed_at)"
                " ORDER BY completed_at",
                (COMPLETE, *(() if study_uid is None else (study_uid,)), pipeline))
            for row in rows:
                waiting.setdefault(row["study_uid"], (row["completed_at"], []))[1].append(pipeline)
        return sorted(((uid, at, names) for uid, (at, names) in waiting.items()),
                      key=lambda item: item[1])

    def study_instance_paths(self, study_uid: str) -> dict[str, list[str]]:
        """Series UID -> the paths of its stored instances, for a study."""
        rows = self._query("SELECT series_uid, path FROM instances WHERE study_uid = ?"
                           " AND state = ? ORDER BY series_uid, received_at", (study_uid, STORED))
        paths: dict[str, list[str]] = {}
        for row in rows:
            paths.setdefault(row["series_uid"], []).append(row["path"])
        return paths

    def record_selection(self, study_uid: str, completed_at: float, pipeline: str,
                         explanation: dict[str, Any], job: NewJob | None
                         ) -> SelectionRecord | None:
        """Keep a pipeline's decision on a study and, for a match, its queued job.

        Nothing is written (None is returned) when the study is no longer complete with the
        completion the decision answered: an instance arrived meanwhile, and the study will
        be selected again once it completes again.
        """
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute("SELECT state, completed_at FROM studies WHERE study_uid = ?",
                              (study_uid,)).fetchone()
            if row is None or row["state"] != COMPLETE or row["completed_at"] != completed_at:
                return None
            cur.execute(
                "INSERT INTO selections (study_uid, pipeline, completed_at, decided_at, matched,"
                " explanation) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (study_uid, pipeline) DO UPDATE SET"
                " completed_at = excluded.completed_at, decided_at = excluded.decided_at,"
                " matched = excluded.matched, explanation = excluded.explanation",
                (study_uid, pipeline, completed_at, now, int(job is not None),
                 json.dumps(explanation)),
            )
            job_id, created = queue_job(cur, job, now) if job else (None, False)
            if job_id is not None:
                self.handoff.infer(cur, job_id, job.model)
            superseded = [r["job_id"] for r in cur.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE study_uid = ? AND pipeline = ?"
                " AND state = ? AND job_key <> ? RETURNING job_id",
                (SUPERSEDED, now, study_uid, pipeline, QUEUED, job.key if job else ""),
            ).fetchall()]
            if job:
                write_event(cur, "selected", study_uid, job.series_uid, None, pipeline=pipeline,
                            job_id=job_id, job_created=created, chosen=job.inputs,
                            superseded=superseded)
            else:
                write_event(cur, "not_selected", study_uid, None, None, pipeline=pipeline,
                            reason=explanation.get("reason"), superseded=superseded)
        return SelectionRecord(job_id, created, superseded)

    def selections(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Every stored decision (only one study's when ``study_uid`` is given), its
        explanation parsed."""
        sql, params = "SELECT * FROM selections", ()
        if study_uid is not None:
            sql, params = sql + " WHERE study_uid = ?", (study_uid,)
        rows = self._query(sql + " ORDER BY study_uid, pipeline", params)
        return [dict(r, matched=bool(r["matched"]), explanation=json.loads(r["explanation"]))
                for r in rows]
