"""Replay: run rules over the complete studies the node holds and find where they would
now choose another series than the recorded decisions did. It reads the state DB and the
spool and writes nothing: no decision, no job (``aiworker select --replay``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiworker.select.decide import (
    Change,
    FeatureSettings,
    Pipeline,
    changes,
    decide,
    describe_series,
    study_headers_from_paths,
)
from aiworker.store.db import StateDB
from aiworker.store.states import COMPLETE


@dataclass(frozen=True)
class ReplayedChange:
    """A change, with the series before and after as a table names them."""

    change: Change
    before: str
    after: str


@dataclass(frozen=True)
class Replay:
    """How many complete studies were checked, and what would change."""

    studies_checked: int
    changes: list[ReplayedChange]


def replay(db: StateDB, pipelines: list[Pipeline], settings: FeatureSettings,
           since_s: float | None = None) -> Replay:
    """Apply ``pipelines`` to the complete studies (only those completed within ``since_s``
    seconds, when given) and compare with the recorded decisions."""
    cutoff = None if since_s is None else time.time() - since_s
    studies = [s for s in db.studies() if s["state"] == COMPLETE
               and (cutoff is None or (s["completed_at"] or 0) >= cutoff)]
    stored = {(d["study_uid"], d["pipeline"]): d["explanation"] for d in db.selections()}
    found = []
    for study in studies:
        uid = study["study_uid"]
        decision = decide(study_headers_from_paths(uid, db.study_instance_paths(uid)),
                          pipelines, settings)
        for p in pipelines:
            for change in changes(stored.get((uid, p.name)), decision, p.name):
                found.append(ReplayedChange(change, describe_series(decision, change.before),
                                            describe_series(decision, change.after)))
    return Replay(len(studies), found)
