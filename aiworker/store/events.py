"""The events table's one writer: what happened (an error, a rejection, a step), with its
ids and a JSON detail, for the dashboard, the CLI and the metrics."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

# Events an operator must see: something was refused, lost, repaired or failed.
PROBLEM_EVENTS = ("store_failed", "association_rejected", "instance_missing", "quarantined",
                  "reconcile", "job_failed")


def write_event(cur: sqlite3.Cursor, kind: str, study_uid: str | None,
                series_uid: str | None, sop_uid: str | None, **detail: Any) -> None:
    """Add one event row inside the caller's transaction."""
    cur.execute(
        "INSERT INTO events (at, kind, study_uid, series_uid, sop_uid, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), kind, study_uid, series_uid, sop_uid, json.dumps(detail) if detail else None),
    )
