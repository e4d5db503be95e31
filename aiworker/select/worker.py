"""The select stage of the node: completed studies in, decisions and queued jobs out.

A thread asks the state DB, twice a second, for complete studies that lack a decision of
some pipeline for their latest completion (:meth:`StateDB.awaiting_selection`). For each,
it reads the headers of the study's stored instances from the spool, applies the pipelines'
rules and records each pipeline's decision with its explanation; a match queues a job.
The hand-off is the DB itself, so a decision owed when the node stopped is made after the
next start, and a study that re-opens (a late arrival) and completes again is selected
again.
"""

from __future__ import annotations

import logging
from typing import Any

from aiworker.polling import PollingStage
from aiworker.select.decide import Pipeline, StudyDecision, decide, study_headers_from_paths
from aiworker.select.features import DEFAULT_SETTINGS, FeatureSettings
from aiworker.store.db import StateDB
from aiworker.store.jobs import NewJob
from aiworker.store.selections import SelectionRecord

log = logging.getLogger("aiworker.select")


class SelectionWorker(PollingStage):
    """Runs :meth:`tick` periodically until stopped."""

    name = "select"

    def __init__(self, db: StateDB, pipelines: list[Pipeline],
                 settings: FeatureSettings = DEFAULT_SETTINGS, interval: float = 0.1):
        super().__init__(interval)
        self.db = db
        self.pipelines = pipelines
        self.settings = settings

    def start(self) -> None:
        for pipeline in self.pipelines:
            log.info("pipeline %s: model %s, rules %s (sha256 %s)", pipeline.name,
                     pipeline.model, pipeline.rules.source, pipeline.rules.sha256[:12])
        super().start()

    def tick(self) -> int:
        """Decide every study that owes a decision now; returns how many were decided."""
        if not self.pipelines:
            return 0
        waiting = self.db.awaiting_selection([p.name for p in self.pipelines])
        for study_uid, completed_at, owed in waiting:
            if self.stopping:
                break
            self.select_study(study_uid, completed_at, owed)
        return len(waiting)

    def select_study(self, study_uid: str, completed_at: float, owed: list[str]) -> None:
        """Apply the pipelines in ``owed`` to one study and record their decisions."""
        pipelines = [p for p in self.pipelines if p.name in owed]
        try:
            headers = study_headers_from_paths(study_uid, self.db.study_instance_paths(study_uid))
            decision: StudyDecision | None = decide(headers, pipelines, self.settings)
            failure = ""
        except Exception as exc:  # recorded as the decision, so it is not retried forever
            log.exception("selection failed for study %s", study_uid)
            decision, failure = None, f"selection failed: {type(exc).__name__}: {exc}"
        for pipeline in pipelines:
            explanation, job = _outcome(study_uid, pipeline, decision, failure)
            record = self.db.record_selection(study_uid, completed_at, pipeline.name,
                                              explanation, job)
            _log(study_uid, pipeline.name, explanation, record)


def _outcome(study_uid: str, pipeline: Pipeline, decision: StudyDecision | None,
             failure: str) -> tuple[dict[str, Any], NewJob | None]:
    """The explanation to record and, for a match, the job to queue."""
    if decision is None:
        return {"study_uid": study_uid, "pipeline": pipeline.name, "matched": False,
                "chosen": {}, "reason": failure, "series": []}, None
    explanation = decision.explanation(pipeline.name)
    if not decision.matched(pipeline.name):
        return explanation, None
    inputs = {role: uid for role, uid in decision.chosen[pipeline.name].items() if uid}
    return explanation, NewJob(pipeline.name, pipeline.model, study_uid, inputs)


def _log(study_uid: str, pipeline: str, explanation: dict[str, Any],
         record: SelectionRecord | None) -> None:
    if record is None:
        log.info("study %s re-opened while %s selected; it will be selected again",
                 study_uid, pipeline)
    elif record.job_id is None:
        log.info("study %s: %s found no match: %s", study_uid, pipeline, explanation["reason"])
    else:
        state = "queued" if record.job_created else "(the same job as before)"
        log.info("study %s: %s chose %s; job %s %s", study_uid, pipeline,
                 explanation["chosen"], record.job_id, state)
    if record is not None and record.superseded:
        log.info("study %s: %s superseded queued jobs %s", study_uid, pipeline,
                 ", ".join(record.superseded))
