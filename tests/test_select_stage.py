"""The select stage over the state DB: completed studies become recorded decisions and queued
jobs; re-completed studies are selected again without duplicate jobs."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from helpers.selection import datasets_of, sag_pd_fs, write

from aiworker.select.decide import Pipeline
from aiworker.select.rules import load_rules
from aiworker.select.worker import SelectionWorker
from aiworker.store.db import StateDB
from aiworker.store.jobs import job_key
from aiworker.store.records import InstanceRecord

REPO = Path(__file__).resolve().parents[1]
STUDY_UID = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def db(tmp_path: Path):
    state = StateDB(tmp_path / "state.db")
    yield state
    state.close()


@pytest.fixture
def worker(db: StateDB) -> SelectionWorker:
    rules = load_rules(REPO / "config" / "rules" / "knee.yaml")
    return SelectionWorker(db, [Pipeline("knee", "knee-demo", rules)])


class Clock:
    """Receive times for the DB, far enough apart that the idle timer completes studies."""

    def __init__(self):
        self.now = time.time() - 10_000

    def tick(self, seconds: float = 100.0) -> float:
        self.now += seconds
        return self.now


def receive(db: StateDB, folder: Path, spec, at: float, study_uid: str = STUDY_UID) -> str:
    """Write a series as files and index it as the receiver would; returns its UID."""
    paths = write(datasets_of(spec, study_uid, "1.2.3.99"), folder)
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        db.record_instance(InstanceRecord.from_dataset(
            ds, path=path, size=path.stat().st_size,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="TEST",
            received_at=at))
    return str(ds.SeriesInstanceUID)


def complete(db: StateDB, clock: Clock) -> None:
    db.complete_idle(clock.tick(), stable_seconds=10)


def events(db: StateDB, kind: str) -> list[dict]:
    return db.events((kind,))


def test_a_match_queues_one_job_and_records_the_explanation(db, worker, tmp_path):
    clock = Clock()
    receive(db, tmp_path / "cor", sag_pd_fs(plane="coronal"), clock.tick())
    target = receive(db, tmp_path / "sag", sag_pd_fs(), clock.now)
    assert worker.tick() == 0  # still receiving
    complete(db, clock)
    assert db.awaiting_selection(["knee"])[0][0] == STUDY_UID
    assert worker.tick() == 1
    [job] = db.jobs()
    assert (job.state, job.series_uid, job.pipeline, job.model) == (
        "queued", target, "knee", "knee-demo")
    assert job.inputs == {"main": target}
    assert job.job_key == job_key(STUDY_UID, {"main": target}, "knee-demo")
    [decision] = db.selections()
    assert decision["matched"] and decision["pipeline"] == "knee"
    explanation = decision["explanation"]
    assert explanation["chosen"] == {"main": target}
    verdicts = {s["series_uid"]: s["verdicts"]["knee/main"] for s in explanation["series"]}
    assert verdicts[target] == {"matched": True, "reason": "chosen: meets every condition"}
    assert [e["detail"]["job_id"] for e in events(db, "selected")] == [job.job_id]
    assert db.awaiting_selection(["knee"]) == []
    assert worker.tick() == 0


def test_no_match_records_the_reason_and_queues_nothing(db, worker, tmp_path):
    clock = Clock()
    receive(db, tmp_path / "t1", sag_pd_fs(te=12, tr=600), clock.tick())
    receive(db, tmp_path / "ax", sag_pd_fs(plane="axial"), clock.now)
    complete(db, clock)
    worker.tick()
    assert db.jobs() == []
    [decision] = db.selections()
    assert not decision["matched"]
    assert decision["explanation"]["reason"] == ("role main: none of the 2 series meets its "
                                                 "conditions")
    reasons = sorted(s["verdicts"]["knee/main"]["reason"]
                     for s in decision["explanation"]["series"])
    assert reasons == ["plane is axial, needs sagittal",
                       "weighting is T1 (TE 12 ms, TR 600 ms), needs PD"]
    [event] = events(db, "not_selected")
    assert event["detail"]["reason"] == decision["explanation"]["reason"]


def test_a_re_completed_study_is_selected_again_without_a_duplicate_job(db, worker, tmp_path):
    clock = Clock()
    target = receive(db, tmp_path / "sag", sag_pd_fs(), clock.tick())
    complete(db, clock)
    worker.tick()
    [first] = db.jobs()
    receive(db, tmp_path / "late", sag_pd_fs(plane="axial"), clock.tick())  # a late series
    assert db.awaiting_selection(["knee"]) == []  # receiving again
    complete(db, clock)
    assert worker.tick() == 1
    assert [j.job_id for j in db.jobs()] == [first.job_id]
    assert db.jobs()[0].series_uid == target
    assert [e["detail"]["job_created"] for e in events(db, "selected")] == [False, True]


def test_a_late_rescan_supersedes_the_queued_job(db, worker, tmp_path):
    clock = Clock()
    receive(db, tmp_path / "sag", sag_pd_fs(acquisition_time="101500"), clock.tick())
    complete(db, clock)
    worker.tick()
    rescan = receive(db, tmp_path / "again", sag_pd_fs(acquisition_time="110000"), clock.tick())
    complete(db, clock)
    worker.tick()
    old, new = db.jobs()
    assert (old.state, new.state, new.series_uid) == ("superseded", "queued", rescan)
    assert events(db, "selected")[0]["detail"]["superseded"] == [old.job_id]


def test_a_decision_for_an_older_completion_is_not_recorded(db, tmp_path):
    clock = Clock()
    receive(db, tmp_path / "sag", sag_pd_fs(), clock.tick())
    complete(db, clock)
    [(study_uid, completed_at, _owed)] = db.awaiting_selection(["knee"])
    receive(db, tmp_path / "late", sag_pd_fs(plane="axial"), clock.tick())  # re-opens it
    assert db.record_selection(study_uid, completed_at, "knee", {"reason": None}, None) is None
    assert db.selections() == []


def test_a_series_with_an_unreadable_file_is_not_chosen(db, worker, tmp_path):
    clock = Clock()
    receive(db, tmp_path / "sag", sag_pd_fs(), clock.tick())
    sorted((tmp_path / "sag").iterdir())[0].write_bytes(b"not DICOM any more")
    complete(db, clock)
    worker.tick()
    [decision] = db.selections()
    assert not decision["matched"]
    assert decision["explanation"]["series"][0]["verdicts"]["knee/main"]["reason"] == (
        "geometry_consistent is false (1 of 20 files are not readable DICOM), needs true")
