"""The states of the state DB's rows, shared by the tables that keep them.

A series and a study are ``receiving`` or ``complete``; an instance is ``stored`` or
``missing`` (its file vanished); a job is ``queued``, ``running``, ``done``, ``failed`` or
``superseded`` (a newer decision no longer wants it), and a failed job's error has one of
:data:`ERROR_KINDS`.
"""

RECEIVING = "receiving"
COMPLETE = "complete"
STORED = "stored"
MISSING = "missing"
QUEUED = "queued"
SUPERSEDED = "superseded"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
ERROR_KINDS = ("data", "model", "resource")
