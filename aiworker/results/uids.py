"""Deterministic identifiers of a job's results.

Every UID a result carries is derived from what the result is *of* (the source series, the
model as ``name@version``) and what it *is* (``seg``, ``sr``, ``sc``, ``hl7``), never drawn at
random. Running or sending a study again therefore yields the same SOP Instance UIDs and
HL7 message control id, and the PACS and RIS replace the earlier result instead of keeping
two.
"""

from __future__ import annotations

import hashlib

from pydicom.uid import generate_uid

KINDS = ("seg", "sr", "sc", "hl7")


def result_uid(series_uid: str, model_id: str, kind: str, part: str = "sop") -> str:
    """The UID of ``part`` (``sop``, ``series``, ...) of the ``kind`` result of a model run
    on a series."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return generate_uid(entropy_srcs=["aiworker-result", series_uid, model_id, kind, part])


def message_control_id(series_uid: str, model_id: str) -> str:
    """The HL7 message control id (MSH-10, 20 characters) of a model run on a series."""
    digest = hashlib.sha256(f"aiworker-hl7|{series_uid}|{model_id}".encode()).hexdigest()
    return digest[:20].upper()
