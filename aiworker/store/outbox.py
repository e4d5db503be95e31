"""The durable outbox: one row per (result object, destination), written before any send.

A job's result objects are files written (and fsynced) before their rows are added; a row
keeps the object's path, never its bytes. Rows live in the state DB (:class:`StateDB`)
next to the jobs, in the table ``outbox``, created on first use. Rows that become due defer
their destination's ``outbox`` job in the same transaction (:mod:`aiworker.store.handoff`;
on PostgreSQL).

States: ``pending`` (waiting for ``next_attempt_at``), ``sending`` (claimed by the
dispatcher), ``sent`` and ``dead`` (given up: the receiver said the object can never be
accepted, or the row kept failing for longer than the retry policy's ``max_age_s``).
A row still ``sending`` when the node starts was cut off by a crash: :meth:`Outbox.recover`
makes it ``pending`` again, and since the object file is the same, the resend carries the
same SOP Instance UID and the PACS replaces instead of duplicating. Every change of
state is one transaction, so a kill -9 loses none; a power cut may lose the last ones
(``synchronous=NORMAL``), which at worst sends an object again. ``attempts`` counts the
sends tried, the successful one included.

Retries back off exponentially: ``base_s * 2**attempts``, times a random factor within
``+-jitter``, at most ``cap_s`` (15 min by default), for ``max_age_s`` (the retry
horizon, 24 h by default; each destination may have its own policy). A row is dead before
the horizon only when the receiver said the object can never be accepted. The age that
``max_age_s`` bounds counts from
``queued_at``: when the row was added or last re-queued by an operator (:meth:`resend_dead`,
:meth:`resend_study`), so a resend gets a full retry window again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiworker.store.db import StateDB

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY,
    job_id           TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    destination      TEXT NOT NULL,
    kind             TEXT NOT NULL,
    object_kind      TEXT NOT NULL,
    path             TEXT NOT NULL,
    sop_instance_uid TEXT,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    created_at       REAL NOT NULL,
    queued_at        REAL NOT NULL,
    updated_at       REAL NOT NULL,
    last_error       TEXT,
    sent_at          REAL,
    UNIQUE (job_id, destination, path)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, destination, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_by_study ON outbox (study_uid)
"""

PENDING = "pending"
SENDING = "sending"
SENT = "sent"
DEAD = "dead"
KINDS = ("dicom", "hl7", "dicomweb")
OBJECT_KINDS = ("seg", "sr", "sc", "hl7")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before the next attempt, and when to give up."""

    base_s: float = 5.0
    cap_s: float = 900.0
    jitter: float = 0.2
    max_age_s: float = 24 * 3600.0

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Seconds to wait after the ``attempts + 1``-th failed attempt."""
        spread = rng.uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.cap_s, self.base_s * 2 ** min(attempts, 32) * spread)


@dataclass(frozen=True)
class NewObject:
    """One object for one destination, as a job's results stage hands it over."""

    destination: str
    kind: str  # dicom | hl7 | dicomweb: how the destination is spoken to
    object_kind: str  # seg | sr | sc | hl7
    path: str
    sop_instance_uid: str | None = None


@dataclass(frozen=True)
class OutboxRow:
    """One row of the outbox."""

    id: int
    job_id: str
    study_uid: str
    destination: str
    kind: str
    object_kind: str
    path: str
    sop_instance_uid: str | None
    state: str
    attempts: int
    next_attempt_at: float
    created_at: float
    queued_at: float
    updated_at: float
    last_error: str | None
    sent_at: float | None


class Outbox:
    """The outbox table of a :class:`StateDB`; every call is one short transaction."""

    def __init__(self, db: StateDB, policy: RetryPolicy | None = None,
                 rng: random.Random | None = None,
                 policies: Mapping[str, RetryPolicy] | None = None):
        self.db = db
        self.policy = policy or RetryPolicy()
        self.policies = dict(policies or {})  # destination -> its own policy
        self._rng = rng or random.Random()
        with db.transaction() as cur:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)

    def add(self, job_id: str, study_uid: str, objects: Iterable[NewObject],
            now: float | None = None) -> list[int]:
        """Add a job's rows in one transaction, due at once; returns the ids of the rows
        added. A (job, destination, path) already in the outbox is left as it is."""
        now = time.time() if now is None else now
        objects = list(objects)
        for obj in objects:
            _check(obj)
        added = []
        with self.db.transaction() as cur:
            for obj in objects:
                row = cur.execute(
                    "INSERT INTO outbox (job_id, study_uid, destination, kind, object_kind, path,"
                    " sop_instance_uid, state, next_attempt_at, created_at, queued_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (job_id, destination, path) DO NOTHING RETURNING id",
                    (job_id, study_uid, obj.destination, obj.kind, obj.object_kind, obj.path,
                     obj.sop_instance_uid, PENDING, now, now, now, now),
                ).fetchone()
                if row is not None:
                    added.append(row["id"])
            for destination in {obj.destination for obj in objects}:
                self.db.handoff.outbox(cur, destination)
        return added

    def recover(self, now: float | None = None, destination: str | None = None) -> int:
        """Make every ``sending`` row (of ``destination`` only, when given) ``pending`` and
        due: its send was cut off by a crash or a stop. Returns how many."""
        now = time.time() if now is None else now
        where, params = ("", ()) if destination is None else (" AND destination = ?",
                                                              (destination,))
        with self.db.transaction() as cur:
            cur.execute("UPDATE outbox SET state = ?, next_attempt_at = ?, updated_at = ?"
                        " WHERE state = ?" + where, (PENDING, now, now, SENDING, *params))
            return cur.rowcount

    def due_destinations(self, now: float) -> list[str]:
        """Destinations with at least one pending row due at ``now``."""
        rows = self.db.query("SELECT DISTINCT destination FROM outbox WHERE state = ?"
                              " AND next_attempt_at <= ? ORDER BY destination", (PENDING, now))
        return [row["destination"] for row in rows]

    def claim(self, destination: str, now: float, limit: int) -> list[OutboxRow]:
        """Mark up to ``limit`` due pending rows of ``destination`` as ``sending`` and
        return them, the longest waiting first."""
        with self.db.transaction() as cur:
            rows = cur.execute(
                "UPDATE outbox SET state = ?, updated_at = ? WHERE id IN (SELECT id FROM outbox"
                " WHERE state = ? AND destination = ? AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, id LIMIT ?) RETURNING *",
                (SENDING, now, PENDING, destination, now, limit),
            ).fetchall()
        return sorted((_row(row) for row in rows), key=lambda r: (r.next_attempt_at, r.id))

    def mark_sent(self, ids: Iterable[int], now: float) -> None:
        """Claimed rows the receiver accepted become ``sent``."""
        with self.db.transaction() as cur:
            for row_id in ids:
                cur.execute("UPDATE outbox SET state = ?, sent_at = ?, updated_at = ?,"
                            " attempts = attempts + 1 WHERE id = ? AND state = ?",
                            (SENT, now, now, row_id, SENDING))

    def mark_failed(self, ids: Iterable[int], error: str, now: float,
                    permanent: bool = False) -> list[int]:
        """Claimed rows that failed: ``dead`` when ``permanent`` or older than the policy's
        ``max_age_s``, else ``pending`` again after the backoff. Returns the rows that
        died."""
        dead = []
        with self.db.transaction() as cur:
            for row_id in ids:
                row = cur.execute("SELECT attempts, queued_at, destination FROM outbox"
                                  " WHERE id = ? AND state = ?", (row_id, SENDING)).fetchone()
                if row is None:
                    continue
                policy = self.policy_for(row["destination"])
                if permanent or now - row["queued_at"] >= policy.max_age_s:
                    cur.execute("UPDATE outbox SET state = ?, attempts = attempts + 1,"
                                " last_error = ?, updated_at = ? WHERE id = ?",
                                (DEAD, error, now, row_id))
                    dead.append(row_id)
                    continue
                retry_at = now + policy.delay(row["attempts"], self._rng)
                cur.execute("UPDATE outbox SET state = ?, attempts = attempts + 1,"
                            " next_attempt_at = ?, last_error = ?, updated_at = ? WHERE id = ?",
                            (PENDING, retry_at, error, now, row_id))
                self.db.handoff.outbox(cur, row["destination"], retry_at)
        return dead

    def policy_for(self, destination: str) -> RetryPolicy:
        """The retry policy of ``destination``: its own, else the outbox's."""
        return self.policies.get(destination, self.policy)

    def resend_dead(self, ids: Iterable[int] | None = None, now: float | None = None) -> int:
        """Queue dead rows again (those of ``ids``, or every one); returns how many."""
        now = time.time() if now is None else now
        sql, params = "state = ?", [DEAD]
        if ids is not None:
            ids = list(ids)
            sql += f" AND id IN ({', '.join('?' * len(ids))})"
            params += ids
        return self._requeue(sql, params, now)

    def resend_job(self, job_id: str, now: float | None = None) -> int:
        """Queue the dead rows of one job again; returns how many."""
        now = time.time() if now is None else now
        return self._requeue("job_id = ? AND state = ?", [job_id, DEAD], now)

    def resend(self, ids: Iterable[int], now: float | None = None) -> int:
        """Queue the rows ``ids`` again when they are sent or dead (a row still pending or
        sending is on its way already); returns how many."""
        now = time.time() if now is None else now
        ids = list(ids)
        if not ids:
            return 0
        return self._requeue(f"id IN ({', '.join('?' * len(ids))}) AND state IN (?, ?)",
                             [*ids, SENT, DEAD], now)

    def resend_study(self, study_uid: str, now: float | None = None) -> int:
        """Queue every sent or dead row of a study again; returns how many."""
        now = time.time() if now is None else now
        return self._requeue("study_uid = ? AND state IN (?, ?)", [study_uid, SENT, DEAD], now)

    def rows(self, study_uid: str | None = None, states: Iterable[str] = (),
             destination: str | None = None) -> list[OutboxRow]:
        """Rows for status, oldest first, optionally of one study, states or destination."""
        where, params = [], []
        if study_uid is not None:
            where.append("study_uid = ?")
            params.append(study_uid)
        states = list(states)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += states
        if destination is not None:
            where.append("destination = ?")
            params.append(destination)
        sql = "SELECT * FROM outbox" + (" WHERE " + " AND ".join(where) if where else "")
        return [_row(row) for row in self.db.query(sql + " ORDER BY id", tuple(params))]

    def counts(self) -> dict[str, dict[str, int]]:
        """Destination -> state -> number of rows."""
        counts: dict[str, dict[str, int]] = {}
        for row in self.db.query("SELECT destination, state, COUNT(*) AS n FROM outbox"
                                  " GROUP BY destination, state"):
            counts.setdefault(row["destination"], {})[row["state"]] = row["n"]
        return counts

    def _requeue(self, where: str, params: list, now: float) -> int:
        """Rows matching ``where`` become pending and due, with a fresh retry window."""
        with self.db.transaction() as cur:
            destinations = cur.execute(
                "UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = ?,"
                " queued_at = ?, updated_at = ?, sent_at = NULL WHERE " + where
                + " RETURNING destination", (PENDING, now, now, now, *params)).fetchall()
            for destination in {row["destination"] for row in destinations}:
                self.db.handoff.outbox(cur, destination)
            return len(destinations)


def _check(obj: NewObject) -> None:
    """Refuse an object whose kinds the dispatcher would not know."""
    if obj.kind not in KINDS:
        raise ValueError(f"outbox kind must be one of {', '.join(KINDS)}, not {obj.kind!r}")
    if obj.object_kind not in OBJECT_KINDS:
        raise ValueError(f"object kind must be one of {', '.join(OBJECT_KINDS)}, "
                         f"not {obj.object_kind!r}")


def _row(row: Any) -> OutboxRow:
    return OutboxRow(**dict(row))
