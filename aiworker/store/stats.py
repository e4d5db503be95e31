"""Counts and durations over the state DB, for the node's Prometheus metrics
(:mod:`aiworker.web.metrics`).

Everything is derived from the tables and events, so it holds for every process that
writes them (``node.receive_processes > 1``, the inference process, the outbox stage) and
survives a restart: the counts are since the data dir was made. Plain SQL that PostgreSQL
also accepts; JSON columns are read in Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiworker.store.db import StateDB
from aiworker.store.outbox import PENDING, SENDING, SENT, Outbox
from aiworker.store.states import DONE


@dataclass
class NodeStats:
    """One reading of the state DB; see :func:`read_stats` for what each field counts."""

    instances: int = 0
    bytes: int = 0
    associations_rejected: int = 0
    store_failures: dict[str, int] = field(default_factory=dict)  # DIMSE status -> count
    series_completed: int = 0
    studies_completed: int = 0
    series: dict[str, int] = field(default_factory=dict)  # state -> count
    studies: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    inference_seconds: list[float] = field(default_factory=list)
    end_to_end_seconds: list[float] = field(default_factory=list)
    outbox: dict[str, dict[str, int]] = field(default_factory=dict)  # dest -> state -> rows
    outbox_failed_attempts: dict[str, int] = field(default_factory=dict)  # dest -> count
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)  # stage -> durations
    purged_studies: dict[str, int] = field(default_factory=dict)  # reason -> studies removed
    purged_bytes: int = 0

    def outbox_depth(self, destination: str) -> int:
        """Rows of ``destination`` still to send (pending or sending)."""
        states = self.outbox.get(destination, {})
        return states.get(PENDING, 0) + states.get(SENDING, 0)


def read_stats(db: StateDB) -> NodeStats:
    """Read every figure the metrics show:

    * ``instances``/``bytes``: instances received and stored (a resend of the same SOP
      Instance UID counts once), and their bytes on disk;
    * ``associations_rejected``, ``store_failures``: ``association_rejected`` and
      ``store_failed`` events (the latter by DIMSE status, e.g. ``0xA700``);
    * ``series_completed``/``studies_completed``: completion events (a series that re-opens
      and completes again counts twice); ``series``/``studies``/``jobs``: rows by state;
    * ``inference_seconds``: each done job's time from sending it to the inference process
      to its reply (the job's ``total`` timing);
    * ``end_to_end_seconds``: for each done job whose outbox rows are all sent, from the
      study's first instance received to the last of those rows accepted;
    * ``outbox``: rows by destination and state; ``outbox_failed_attempts``: sends that
      failed, summed over rows (since each row was last queued: a resend starts afresh);
    * ``stage_seconds``: the durations of each stage (:data:`STAGES`; see
      :func:`_stage_seconds`);
    * ``purged_studies``/``purged_bytes``: studies removed by retention or an operator
      (``study_purged`` events), by reason (age, disk, operator), and their bytes.
    """
    stats = NodeStats()
    (stats.instances, stats.bytes), = [tuple(r) for r in db.query(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances")]
    stats.associations_rejected = _count_events(db, "association_rejected")
    for row in db.query("SELECT detail FROM events WHERE kind = ?", ("store_failed",)):
        status = json.loads(row["detail"] or "{}").get("status") or "unknown"
        stats.store_failures[status] = stats.store_failures.get(status, 0) + 1
    stats.series_completed = _count_events(db, "series_completed")
    stats.studies_completed = _count_events(db, "study_completed")
    stats.series = _by_state(db, "series")
    stats.studies = _by_state(db, "studies")
    stats.jobs = _by_state(db, "jobs")
    for row in db.query("SELECT timings FROM jobs WHERE state = ?", (DONE,)):
        total = json.loads(row["timings"] or "{}").get("total")
        if total is not None:
            stats.inference_seconds.append(float(total))
    outbox = Outbox(db)  # makes sure the table is there
    stats.end_to_end_seconds = _end_to_end(db)
    stats.outbox = outbox.counts()
    for row in db.query(
            "SELECT destination, SUM(attempts - CASE WHEN state = ? THEN 1 ELSE 0 END) AS n"
            " FROM outbox GROUP BY destination", (SENT,)):
        stats.outbox_failed_attempts[row["destination"]] = int(row["n"] or 0)
    stats.stage_seconds = _stage_seconds(db)
    for row in db.query("SELECT detail FROM events WHERE kind = ?", ("study_purged",)):
        detail = json.loads(row["detail"] or "{}")
        reason = detail.get("reason", "unknown")
        stats.purged_studies[reason] = stats.purged_studies.get(reason, 0) + 1
        stats.purged_bytes += int(detail.get("bytes", 0))
    return stats


STAGES = ("receive", "queue_wait", "inference", "result_objects", "send")
INFERENCE_STEPS = ("load", "preprocess", "model", "postprocess", "resample", "write")
OBJECT_STEPS = ("seg", "sr", "report", "hl7", "preview")


def _stage_seconds(db: StateDB) -> dict[str, list[float]]:
    """Seconds per stage: ``receive`` (a complete study's first to last instance),
    ``queue_wait`` (a job queued to taken by the inference process), ``inference`` (its
    load, model and label steps), ``result_objects`` (SEG, SR, report, HL7, preview) and
    ``send`` (a done job to its last result accepted, when all are)."""
    seconds: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for row in db.query("SELECT first_received, last_received FROM studies"
                         " WHERE completed_at IS NOT NULL"):
        seconds["receive"].append(row["last_received"] - row["first_received"])
    for row in db.query("SELECT state, created_at, started_at, timings FROM jobs"
                         " WHERE started_at IS NOT NULL"):
        seconds["queue_wait"].append(max(0.0, row["started_at"] - row["created_at"]))
        timings = json.loads(row["timings"] or "{}") if row["state"] == DONE else {}
        for stage, steps in (("inference", INFERENCE_STEPS), ("result_objects", OBJECT_STEPS)):
            if any(step in timings for step in steps):
                seconds[stage].append(sum(timings.get(step, 0.0) for step in steps))
    for row in db.query(
            "SELECT j.finished_at AS done, MAX(o.sent_at) AS sent,"
            " SUM(CASE WHEN o.state = ? THEN 0 ELSE 1 END) AS unsent"
            " FROM jobs j JOIN outbox o ON o.job_id = j.job_id WHERE j.state = ?"
            " GROUP BY j.job_id, j.finished_at", (SENT, DONE)):
        if row["unsent"] == 0 and row["sent"] is not None:
            seconds["send"].append(max(0.0, row["sent"] - row["done"]))
    return seconds


def _count_events(db: StateDB, kind: str) -> int:
    return db.query("SELECT COUNT(*) AS n FROM events WHERE kind = ?", (kind,))[0]["n"]


def _by_state(db: StateDB, table: str) -> dict[str, int]:
    """Rows of ``table`` (a constant) by state."""
    rows = db.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
    return {row["state"]: row["n"] for row in rows}


def _end_to_end(db: StateDB) -> list[float]:
    """Seconds from a study's first instance to the last sent row of each done job whose
    rows are all sent."""
    rows = db.query(
        "SELECT s.first_received AS received, MAX(o.sent_at) AS sent,"
        " SUM(CASE WHEN o.state = ? THEN 0 ELSE 1 END) AS unsent"
        " FROM jobs j JOIN studies s ON s.study_uid = j.study_uid"
        " JOIN outbox o ON o.job_id = j.job_id WHERE j.state = ?"
        " GROUP BY j.job_id, s.first_received", (SENT, DONE))
    return [max(0.0, row["sent"] - row["received"]) for row in rows
            if row["unsent"] == 0 and row["sent"] is not None]
