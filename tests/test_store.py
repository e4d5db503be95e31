"""The store without sockets: atomic spool writes, the state DB's counts and completion rules,
and the start-up reconcile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
import pytest

from aiworker.store.completion import CompletionScheduler
from aiworker.store.db import StateDB
from aiworker.store.reconcile import reconcile
from aiworker.store.records import InstanceRecord
from aiworker.store.spool import InvalidUID, Spool, check_uid

STUDY = "1.2.3.4"


def record(series: str, sop: str, *, at: float, study: str = STUDY,
           expected: int | None = None, path: Path | None = None, frames: int = 1,
           size: int = 100, acquisition: int | None = 1) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        transfer_syntax="1.2.840.10008.1.2.1", path=path or Path(f"/spool/{sop}.dcm"),
        size=size, frames=frames, expected_frames=expected, acquisition_number=acquisition,
        modality="MR", series_number=1,
        series_description="PD FS SAG", study_description="MR KNEE", study_date="20260101",
        accession_number="ACC1", patient_id="PID1", patient_name="DOE^JANE",
        calling_ae="MRI1", received_at=at,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path):
    """The state DB on each backend: the same store code, the same assertions."""
    where = tmp_path / "state.db" if request.param == "sqlite" else \
        request.getfixturevalue("pg_url")
    state = StateDB(where)
    yield state
    state.close()


def events(db: StateDB, kind: str) -> list[dict]:
    """The events of one kind, oldest first, read with plain SQL."""
    rows = db.query("SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,))
    return [dict(r, detail=json.loads(r["detail"] or "{}")) for r in rows]


def series_row(db: StateDB, series_uid: str) -> dict:
    return next(s for study in db.studies() for s in study["series"]
                if s["series_uid"] == series_uid)


def study_row(db: StateDB, study_uid: str = STUDY) -> dict:
    return next(s for s in db.studies() if s["study_uid"] == study_uid)


# --- spool -----------------------------------------------------------------------------------


def test_spool_write_is_atomic_and_exact(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    chunks = [b"\x00" * 128, b"DICM", os.urandom(10_000), b"tail"]
    size = spool.write(path, chunks)
    assert size == sum(map(len, chunks))
    assert path.read_bytes() == b"".join(chunks)
    assert list(spool.temporary_files()) == []
    assert list(path.parent.iterdir()) == [path]
    assert list(spool.instance_files()) == [path]

    # a resend replaces the file in one rename
    spool.write(path, [b"second version"])
    assert path.read_bytes() == b"second version"
    assert list(path.parent.iterdir()) == [path]


def test_spool_write_that_fails_midway_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.write(path, [b"good"])

    def failing_chunks():
        yield b"partial data"
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        spool.write(path, failing_chunks())
    assert path.read_bytes() == b"good"
    assert list(path.parent.iterdir()) == [path]
    assert list(spool.temporary_files()) == []


@pytest.mark.parametrize("uid", ["../x", "", "1.2/3", "1.2.3.", ".1", "1.2.a", "1" * 65,
                                 "1.2.3\x00", "1.2.3\n", "/etc/passwd"])
def test_spool_refuses_uids_that_are_not_uids(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUID):
        spool.path_for(uid, "1.2", "1.2.3")
    with pytest.raises(InvalidUID):
        spool.path_for("1.2", uid, "1.2.3")
    with pytest.raises(InvalidUID):
        spool.path_for("1.2", "1.2.3", uid)
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [".incoming"]  # nothing made


def test_check_uid_accepts_a_64_character_uid() -> None:
    uid = "1." + "2" * 62
    assert len(uid) == 64
    assert check_uid(uid, "x") == uid


# --- state DB: counting and completion ---------------------------------------------------------


def test_resent_instance_counts_once(db: StateDB) -> None:
    first = db.record_instance(record("1.1", "1.1.1", at=100.0))
    again = db.record_instance(record("1.1", "1.1.1", at=101.0, size=120))
    assert first.new is True
    assert again.new is False
    series = series_row(db, "1.1")
    assert series["instance_count"] == 1
    assert series["frame_count"] == 1
    assert series["bytes"] == 120  # the resend replaced the first copy
    assert len(db.instances("1.1")) == 1
    db.record_instance(record("1.1", "1.1.2", at=102.0))
    assert series_row(db, "1.1")["instance_count"] == 2
    assert [e["kind"] for e in events(db, "series_started")] == ["series_started"]


def test_expected_count_closes_series(db: StateDB) -> None:
    results = [db.record_instance(record("1.1", f"1.1.{i}", at=100.0 + i, expected=3))
               for i in range(3)]
    assert [r.completed for r in results] == [False, False, True]
    series = series_row(db, "1.1")
    assert series["state"] == "complete"
    assert series["closed_by"] == "expected_count"
    assert series["expected_frames"] == 3
    assert series["completed_at"] == 102.0
    [event] = events(db, "series_completed")
    assert event["series_uid"] == "1.1"
    assert event["detail"]["rule"] == "expected_count"
    assert event["detail"]["instances"] == 3
    # the study is not complete until it has been idle (another series may still come)
    assert study_row(db)["state"] == "receiving"


def test_second_acquisition_hands_the_series_to_the_idle_timer(db: StateDB) -> None:
    """ImagesInAcquisition counts one acquisition: after an early close, an image of a second
    acquisition re-opens the series, and only the idle timer may close it again."""
    for i in range(2):
        db.record_instance(record("1.1", f"1.1.{i}", at=100.0 + i, expected=2, acquisition=1))
    assert series_row(db, "1.1")["closed_by"] == "expected_count"

    results = [db.record_instance(record("1.1", f"1.1.{i}", at=100.0 + i, expected=2,
                                         acquisition=2)) for i in range(2, 4)]
    assert results[0].reopened
    assert not any(r.completed for r in results)
    assert series_row(db, "1.1")["state"] == "receiving"
    assert len(events(db, "late_arrival")) == 1

    assert db.complete_idle(now=200.0, stable_seconds=10) == ["1.1"]
    series = series_row(db, "1.1")
    assert (series["state"], series["closed_by"], series["instance_count"]) == (
        "complete", "idle_timer", 4)


def test_multiframe_instance_completes_by_its_frame_count(db: StateDB) -> None:
    result = db.record_instance(record("1.1", "1.1.1", at=100.0, frames=40, expected=40))
    assert result.completed
    assert series_row(db, "1.1")["frame_count"] == 40


def test_complete_idle_closes_quiet_series_then_study(db: StateDB) -> None:
    db.record_instance(record("1.1", "1.1.1", at=100.0))
    db.record_instance(record("1.2", "1.2.1", at=105.0))

    assert db.complete_idle(now=104.0, stable_seconds=10) == []
    assert db.complete_idle(now=110.0, stable_seconds=10) == ["1.1"]
    first = series_row(db, "1.1")
    assert (first["state"], first["closed_by"], first["completed_at"]) == (
        "complete", "idle_timer", 110.0)
    assert series_row(db, "1.2")["state"] == "receiving"
    assert study_row(db)["state"] == "receiving"  # one series still receiving

    assert db.complete_idle(now=115.0, stable_seconds=10) == ["1.2"]
    study = study_row(db)
    assert study["state"] == "complete"
    assert study["completed_at"] == 115.0
    assert [e["study_uid"] for e in events(db, "study_completed")] == [STUDY]
    assert db.complete_idle(now=200.0, stable_seconds=10) == []
    assert len(events(db, "study_completed")) == 1


def test_study_waits_for_idle_even_when_all_series_closed_by_count(db: StateDB) -> None:
    db.record_instance(record("1.1", "1.1.1", at=100.0, expected=1))
    assert series_row(db, "1.1")["state"] == "complete"
    db.complete_idle(now=105.0, stable_seconds=10)
    assert study_row(db)["state"] == "receiving"
    db.complete_idle(now=110.0, stable_seconds=10)
    assert study_row(db)["state"] == "complete"
    # the series kept its own rule
    assert series_row(db, "1.1")["closed_by"] == "expected_count"


def test_late_arrival_reopens_complete_series(db: StateDB) -> None:
    db.record_instance(record("1.1", "1.1.1", at=100.0))
    db.record_instance(record("1.1", "1.1.2", at=100.0))
    db.complete_idle(now=120.0, stable_seconds=10)
    assert series_row(db, "1.1")["state"] == "complete"
    assert study_row(db)["state"] == "complete"

    late = db.record_instance(record("1.1", "1.1.3", at=130.0))
    assert late.reopened and late.new and not late.completed
    series = series_row(db, "1.1")
    assert series["state"] == "receiving"
    assert series["closed_by"] is None
    assert series["completed_at"] is None
    assert series["instance_count"] == 3
    study = study_row(db)
    assert study["state"] == "receiving" and study["completed_at"] is None
    [event] = events(db, "late_arrival")
    assert (event["series_uid"], event["sop_uid"]) == ("1.1", "1.1.3")

    db.complete_idle(now=141.0, stable_seconds=10)
    assert series_row(db, "1.1")["state"] == "complete"
    assert study_row(db)["state"] == "complete"


def test_resend_after_completion_is_a_late_arrival_with_same_count(db: StateDB) -> None:
    for i in range(2):
        db.record_instance(record("1.1", f"1.1.{i}", at=100.0, expected=2))
    assert series_row(db, "1.1")["closed_by"] == "expected_count"
    again = db.record_instance(record("1.1", "1.1.0", at=200.0, expected=2))
    assert again.reopened and not again.new
    series = series_row(db, "1.1")
    assert series["instance_count"] == 2
    assert series["state"] == "complete" and series["closed_by"] == "expected_count"
    assert len(events(db, "late_arrival")) == 1


def test_instance_moved_to_another_series_is_recounted(db: StateDB) -> None:
    db.record_instance(record("1.1", "9.9", at=100.0))
    db.record_instance(record("1.2", "9.9", at=101.0))
    assert series_row(db, "1.1")["instance_count"] == 0
    assert series_row(db, "1.2")["instance_count"] == 1


def test_completion_scheduler_tick(tmp_path: Path, db: StateDB) -> None:
    import time

    db.record_instance(record("1.1", "1.1.1", at=time.time() - 5))
    scheduler = CompletionScheduler(db, stable_seconds=2)
    assert scheduler.interval == 0.5
    assert scheduler.tick() == ["1.1"]
    assert study_row(db)["state"] == "complete"


def test_db_survives_reopen(tmp_path: Path) -> None:
    first = StateDB(tmp_path / "state.db")
    first.record_instance(record("1.1", "1.1.1", at=100.0))
    first.close()
    second = StateDB(tmp_path / "state.db")
    try:
        assert series_row(second, "1.1")["instance_count"] == 1
    finally:
        second.close()


# --- reconcile ---------------------------------------------------------------------------------


def test_reconcile_repairs_spool_and_db(tmp_path: Path, make_study) -> None:
    study = make_study(series=1, slices=4)
    spool = Spool(tmp_path / "var" / "spool")
    db = StateDB(tmp_path / "var" / "state.db")
    quarantine = tmp_path / "var" / "quarantine"
    try:
        written = []
        for source in study.files:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
            path = spool.path_for(study.study_uid, study.series_of[source],
                                  study.sop_uid[source])
            size = spool.write(path, [source.read_bytes()])
            written.append((path, ds, size))
        # instances 0 and 1 are in the DB; 2 was written but its DB commit was lost;
        for path, ds, size in written[:2]:
            db.record_instance(InstanceRecord.from_dataset(
                ds, path=path, size=size, transfer_syntax="1.2.840.10008.1.2.1",
                calling_ae="MRI1", received_at=100.0))
        # 1's file vanished; 3's file is garbage; and a crash left a temporary behind.
        written[1][0].unlink()
        garbage = written[3][0]
        garbage.write_bytes(b"this is not DICOM" * 20)
        temp = garbage.parent / f".{garbage.stem}.deadbeef.tmp"
        temp.write_bytes(b"half a file")
        spool.incoming.mkdir(exist_ok=True)
        incoming_temp = spool.incoming / ".0123456789abcdef.tmp"
        incoming_temp.write_bytes(b"half a stream")

        report = reconcile(spool, db, quarantine)

        assert (report.temporaries_removed, report.marked_missing, report.indexed,
                report.quarantined) == (2, 1, 1, 1)
        assert not temp.exists()
        assert not incoming_temp.exists()
        assert list(spool.temporary_files()) == []
        by_sop = {i["sop_uid"]: i for i in db.instances(study.series_of[study.files[0]])}
        sops = [study.sop_uid[f] for f in study.files]
        assert by_sop[sops[0]]["state"] == "stored"
        assert by_sop[sops[1]]["state"] == "missing"
        assert by_sop[sops[2]]["state"] == "stored"  # indexed from the spool
        assert by_sop[sops[2]]["path"] == str(written[2][0])
        assert by_sop[sops[2]]["size"] == written[2][2]
        assert sops[3] not in by_sop  # garbage is never indexed
        assert series_row(db, study.series_of[study.files[0]])["instance_count"] == 2
        [missing] = events(db, "instance_missing")
        assert missing["sop_uid"] == sops[1]
        # the garbage file was moved out of the spool, bytes intact
        assert not garbage.exists()
        [moved] = list(quarantine.iterdir())
        assert moved.read_bytes() == b"this is not DICOM" * 20
        assert moved.name.endswith(garbage.name)
        [event] = events(db, "quarantined")
        assert event["detail"]["path"] == str(moved)
        [summary] = events(db, "reconcile")
        assert summary["detail"] == {"temporaries_removed": 2, "marked_missing": 1,
                                     "indexed": 1, "quarantined": 1}

        # a second reconcile has nothing to do
        again = reconcile(spool, db, quarantine)
        assert (again.temporaries_removed, again.marked_missing, again.indexed,
                again.quarantined) == (0, 0, 0, 0)
    finally:
        db.close()


def test_reconcile_quarantines_file_whose_name_does_not_match_header(
        tmp_path: Path, make_study) -> None:
    study = make_study(series=1, slices=1)
    spool = Spool(tmp_path / "spool")
    db = StateDB(tmp_path / "state.db")
    try:
        source = study.files[0]
        wrong = spool.path_for(study.study_uid, study.series_of[source], "1.2.3.999")
        spool.write(wrong, [source.read_bytes()])
        report = reconcile(spool, db, tmp_path / "quarantine")
        assert report.quarantined == 1 and report.indexed == 0
        assert db.studies() == []
        assert not wrong.exists()
    finally:
        db.close()


def test_instance_resent_in_another_series_supersedes_the_first_file(db: StateDB) -> None:
    first = db.record_instance(record("1.1", "9.9", at=100.0, path=Path("/spool/a/9.9.dcm")))
    assert first.superseded is None
    again = db.record_instance(record("1.2", "9.9", at=101.0, path=Path("/spool/b/9.9.dcm")))
    assert again.superseded == "/spool/a/9.9.dcm"
    assert series_row(db, "1.1")["instance_count"] == 0
    assert series_row(db, "1.2")["instance_count"] == 1
    same = db.record_instance(record("1.2", "9.9", at=102.0, path=Path("/spool/b/9.9.dcm")))
    assert same.superseded is None and not same.new
