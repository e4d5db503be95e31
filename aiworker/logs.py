"""Logging set-up: plain lines or one JSON object per line, PHI-free by convention (UIDs,
AE titles, counts only).

aiworker's own loggers log at ``logging.level``; every other library (highdicom, pydicom,
pynetdicom, MONAI, uvicorn, ...) only at WARNING and above, unless ``logging.verbose`` (the
``--verbose`` option) lets them speak at ``logging.level`` too.

A JSON line holds ``time``, ``level``, ``area`` (the logger), ``stage`` (``receive``,
``select``, ``infer``, ``dispatch``, ``store``, ``web``, ...), ``message``, and the ids and
duration a record carries as ``extra``: ``study_uid``, ``series_uid``, ``job_id``,
``duration_s``.
"""

from __future__ import annotations

import json
import logging
import sys

OWN = "aiworker"
EXTRA_FIELDS = ("study_uid", "series_uid", "job_id", "duration_s")
PLAIN = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "area": record.name,
            "stage": _stage(record.name),
            "message": record.getMessage(),
        }
        entry |= {name: getattr(record, name) for name in EXTRA_FIELDS if hasattr(record, name)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _stage(logger: str) -> str | None:
    parts = logger.split(".")
    return parts[1] if parts[0] == OWN and len(parts) > 1 else None


def setup(level: str = "INFO", fmt: str = "plain", verbose: bool = False) -> None:
    """Send every record to stderr in ``fmt`` (``plain`` or ``json``): aiworker's at
    ``level``, other libraries' at WARNING unless ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if verbose else max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger(OWN).setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG: its warnings and errors only, even verbose.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
