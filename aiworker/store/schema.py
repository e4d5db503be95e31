"""The state DB's tables, in the SQLite dialect :mod:`aiworker.store.backend` also runs
on PostgreSQL, and the columns added to
a table after its first release, which an older DB gets at start."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid         TEXT PRIMARY KEY,
    patient_id        TEXT,
    patient_name      TEXT,
    accession_number  TEXT,
    study_date        TEXT,
    study_description TEXT,
    calling_ae        TEXT,
    first_received    REAL NOT NULL,
    last_received     REAL NOT NULL,
    state             TEXT NOT NULL,
    completed_at      REAL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid         TEXT PRIMARY KEY,
    study_uid          TEXT NOT NULL REFERENCES studies (study_uid),
    modality           TEXT,
    series_number      INTEGER,
    series_description TEXT,
    sop_class_uid      TEXT,
    calling_ae         TEXT,
    first_received     REAL NOT NULL,
    last_received      REAL NOT NULL,
    instance_count     INTEGER NOT NULL DEFAULT 0,
    frame_count        INTEGER NOT NULL DEFAULT 0,
    bytes              INTEGER NOT NULL DEFAULT 0,
    expected_frames    INTEGER,
    state              TEXT NOT NULL,
    closed_by          TEXT,
    completed_at       REAL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid         TEXT PRIMARY KEY,
    series_uid      TEXT NOT NULL REFERENCES series (series_uid),
    study_uid       TEXT NOT NULL,
    sop_class_uid   TEXT,
    transfer_syntax TEXT,
    path            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    frames          INTEGER NOT NULL,
    acquisition_number INTEGER,
    calling_ae      TEXT,
    received_at     REAL NOT NULL,
    state           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS events (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    kind       TEXT NOT NULL,
    study_uid  TEXT,
    series_uid TEXT,
    sop_uid    TEXT,
    detail     TEXT
);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind);
CREATE TABLE IF NOT EXISTS selections (
    study_uid    TEXT NOT NULL,
    pipeline     TEXT NOT NULL,
    completed_at REAL NOT NULL,
    decided_at   REAL NOT NULL,
    matched      INTEGER NOT NULL,
    explanation  TEXT NOT NULL,
    PRIMARY KEY (study_uid, pipeline)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id     TEXT PRIMARY KEY,
    job_key    TEXT NOT NULL UNIQUE,
    pipeline   TEXT NOT NULL,
    model      TEXT NOT NULL,
    study_uid  TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    inputs     TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    device      TEXT,
    timings     TEXT,
    findings    TEXT,
    error       TEXT,
    error_kind  TEXT,
    result_dir  TEXT,
    dispatched_at REAL,
    warnings    TEXT,
    worker      TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    worker     TEXT PRIMARY KEY,
    queues     TEXT NOT NULL,
    devices    TEXT,
    started_at REAL NOT NULL,
    seen_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
"""


# Columns added to a table after its first release: an older DB gets them at start.
ADDED_COLUMNS = {
    "jobs": {"started_at": "REAL", "finished_at": "REAL",
             "attempts": "INTEGER NOT NULL DEFAULT 0", "device": "TEXT", "timings": "TEXT",
             "findings": "TEXT", "error": "TEXT", "error_kind": "TEXT", "result_dir": "TEXT",
             "dispatched_at": "REAL", "warnings": "TEXT", "worker": "TEXT"},
}
