"""The chaos soak's invariants (bench/soak.py): what must hold once the faults have stopped
and the node has had its quiet period, checked over what the soak observed.

Pure functions over an :class:`Observations`, so a test can feed a fabricated one (a SEG
missing at the PACS must fail). Each invariant gives ``held`` and, when it failed, up to
:data:`MAX_DETAILS` lines naming what broke it (UIDs and row ids, never patient data).

At-least-once delivery lets a receiver see the same object twice: the PACS may store the
same SOP Instance UID more than once (counted as duplicate receives, allowed) and the RIS
may get the same ORU^R01 (same MSH-10) again. What is never allowed is a second, different
SEG or SR SOP Instance UID for a study, or a second control ID.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

MAX_DETAILS = 10


@dataclass(frozen=True)
class Expected:
    """What the node produced for one selected study: its job, and the SOP Instance UIDs of
    the SEG and SR and the HL7 control ID (MSH-10) of its results (None: never written)."""

    job_id: str
    job_state: str
    seg_uid: str | None
    sr_uid: str | None
    control_id: str | None


@dataclass(frozen=True)
class Received:
    """One complete file the PACS wrote: its study, SOP Instance UID and kind (seg, sr,
    other)."""

    study_uid: str
    sop_uid: str
    kind: str


@dataclass
class Observations:
    """Everything the soak saw, gathered after the quiet period."""

    acked: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> study UID
    unfinished_studies: list[str] = field(default_factory=list)
    spool: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> files
    selected: dict[str, list[Expected]] = field(default_factory=dict)  # study -> its jobs
    pacs: list[Received] = field(default_factory=list)
    ris: list[tuple[str, str]] = field(default_factory=list)  # (study UID, MSH-10)
    stuck: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Invariant:
    name: str
    held: bool
    details: list[str]


def _invariant(name: str, problems: list[str]) -> Invariant:
    extra = len(problems) - MAX_DETAILS
    shown = problems[:MAX_DETAILS] + ([f"... and {extra} more"] if extra > 0 else [])
    return Invariant(name, not problems, shown)


def acked_in_spool_once(obs: Observations) -> Invariant:
    problems = [f"instance {sop} (study {study}): {obs.spool.get(sop, 0)} files in the spool"
                for sop, study in sorted(obs.acked.items()) if obs.spool.get(sop, 0) != 1]
    return _invariant("every acknowledged instance is in the spool once", problems)


def studies_finished(obs: Observations) -> Invariant:
    return _invariant("every study the senders started was acknowledged completely",
                      [f"study {uid}: not every instance acknowledged"
                       for uid in obs.unfinished_studies])


def studies_selected(obs: Observations) -> Invariant:
    problems = [f"study {uid}: sent but no job" for uid in sorted(set(obs.acked.values()))
                if uid not in obs.selected]
    problems += [f"study {uid}: {len(jobs)} jobs ({', '.join(j.job_id for j in jobs)})"
                 for uid, jobs in sorted(obs.selected.items()) if len(jobs) != 1]
    return _invariant("every study sent has one job", problems)


def _one_uid(study: str, what: str, expected: str | None, seen: set[str]) -> list[str]:
    if expected is None:
        return [f"study {study}: the node wrote no {what}"]
    if seen != {expected}:
        return [f"study {study}: {what} at the receiver {sorted(seen) or 'none'}, "
                f"expected {expected}"]
    return []


def pacs_has_one_seg_and_sr(obs: Observations) -> Invariant:
    by_study: dict[tuple[str, str], set[str]] = defaultdict(set)
    for item in obs.pacs:
        by_study[item.study_uid, item.kind].add(item.sop_uid)
    problems = []
    for study, jobs in sorted(obs.selected.items()):
        for job in jobs:
            problems += _one_uid(study, "SEG", job.seg_uid, by_study[study, "seg"])
            problems += _one_uid(study, "SR", job.sr_uid, by_study[study, "sr"])
    problems += [f"study {study}: {kind} {sorted(uids)} at the PACS for a study never selected"
                 for (study, kind), uids in sorted(by_study.items())
                 if study not in obs.selected and uids]
    return _invariant("every selected study has one SEG and one SR at the PACS", problems)


def ris_has_one_control_id(obs: Observations) -> Invariant:
    by_study: dict[str, set[str]] = defaultdict(set)
    for study, control_id in obs.ris:
        by_study[study].add(control_id)
    problems = []
    for study, jobs in sorted(obs.selected.items()):
        for job in jobs:
            problems += _one_uid(study, "HL7 control ID", job.control_id, by_study[study])
    problems += [f"study {study}: control IDs {sorted(ids)} at the RIS for a study never "
                 "selected" for study, ids in sorted(by_study.items())
                 if study not in obs.selected]
    return _invariant("every selected study has one control ID at the RIS", problems)


def nothing_stuck(obs: Observations) -> Invariant:
    return _invariant("no job or outbox row stuck after the quiet period", list(obs.stuck))


def no_orphans(obs: Observations) -> Invariant:
    return _invariant("no orphan process after the final stop", list(obs.orphans))


def no_unexpected_exit(obs: Observations) -> Invariant:
    return _invariant("the node never exited unless killed or stopped",
                      list(obs.unexpected_exits))


CHECKS = (acked_in_spool_once, studies_finished, studies_selected, pacs_has_one_seg_and_sr,
          ris_has_one_control_id, nothing_stuck, no_orphans, no_unexpected_exit)


def check(obs: Observations) -> list[Invariant]:
    """Every invariant over ``obs``, in a fixed order."""
    return [invariant(obs) for invariant in CHECKS]


def duplicates(obs: Observations) -> dict[str, int]:
    """How often a receiver saw something again (allowed by at-least-once delivery)."""
    pacs = Counter(item.sop_uid for item in obs.pacs)
    ris = Counter(control_id for _, control_id in obs.ris)
    return {"pacs_duplicate_receives": sum(n - 1 for n in pacs.values()),
            "ris_duplicate_messages": sum(n - 1 for n in ris.values())}
