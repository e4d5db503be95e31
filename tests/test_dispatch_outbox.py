"""The durable outbox and its dispatcher, against a real dcmtk ``storescp`` on loopback:
delivery, retries with backoff on a fake clock, dead letters at the maximum age, resends,
crash recovery, and destinations that fail without holding up the others.

The objects are real: a few phantom MR instances and the job's DICOM SEG built from the
phantom's truth labels."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from helpers.dicom import dataset_bytes
from helpers.tools import dcmtk_env, free_port, needs_dcmtk, port_open, wait_until

from aiworker.config import DicomDestination, HL7Destination
from aiworker.dispatch.mllp import MllpReceiver
from aiworker.dispatch.outbox import (
    DEAD,
    RETRY,
    SENT,
    Dispatcher,
    Outcome,
    default_senders,
    dicom_status_outcome,
    send_dicom,
)
from aiworker.infer.registry import Registry, model_id
from aiworker.infer.volume import labels_to_series, load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series
from aiworker.results.seg import build_seg
from aiworker.store.db import StateDB
from aiworker.store.outbox import NewObject, Outbox, RetryPolicy

pytestmark = needs_dcmtk

CALLING_AE = "AIWORKER"
POLICY = RetryPolicy(base_s=5, cap_s=600, jitter=0.2, max_age_s=3600)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class StoreSCP:
    """A dcmtk storescp on a loopback port, writing every arrival to its own file."""

    def __init__(self, root: Path, ae_title: str = "PACS"):
        self.port = free_port()
        self.ae_title = ae_title
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.dir), "+B", "+uf",
             str(self.port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 10, "storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def destination(self) -> DicomDestination:
        return DicomDestination(kind="dicom", host="127.0.0.1", port=self.port,
                                ae_title=self.ae_title)

    def received(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def received_uids(self) -> list[str]:
        return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                      for p in self.received())


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three phantom MR instances and the SEG of their series (from the truth labels)."""
    root = tmp_path_factory.mktemp("objects")
    study = write_study(root / "study", StudyOptions(
        seed=5, rescan=False, derived=False, overrides=Overrides(roles=("sag_pd_fs",),
                                                                 matrix=128)))
    files = truth_series(study).files
    loaded = load_series(files)
    labels = labels_to_series(sitk.ReadImage(str(study.truth.labels)), loaded)
    spec = Registry().get("knee-demo")
    seg = build_seg([pydicom.dcmread(p) for p in files], loaded, labels, spec.manifest,
                    model_id(spec))
    seg_path = root / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    return [*files[:3], seg_path]


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    server = StoreSCP(tmp_path / "pacs").start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateDB]:
    """The state DB on each backend: the outbox runs the same SQL on both."""
    where = tmp_path / "state.db" if request.param == "sqlite" else \
        request.getfixturevalue("pg_url")
    state = StateDB(where)
    yield state
    state.close()


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def queue(outbox: Outbox, files: list[Path], destination: str, now: float,
          job_id: str = "job-1", study_uid: str = "1.2.3") -> list[int]:
    """Add one row per file for ``destination``, as the results stage will."""
    return outbox.add(job_id, study_uid, [
        NewObject(destination, "dicom", "seg" if path.name == "seg.dcm" else "sc", str(path),
                  sop_uid(path)) for path in files], now)


def dispatcher(db: StateDB, clock: Clock, destinations: dict, **kwargs) -> Dispatcher:
    senders = kwargs.pop("senders", None) or {
        "dicom": lambda dest, paths: send_dicom(dest, paths, CALLING_AE, timeout_s=5)}
    return Dispatcher(db, destinations, senders, clock, policy=POLICY, **kwargs)


def unused_destination() -> DicomDestination:
    """A destination nothing listens on: every association is refused."""
    return DicomDestination(kind="dicom", host="127.0.0.1", port=free_port(), ae_title="DOWN")


def test_delivers_every_object_with_its_own_bytes(db, scp, objects):
    clock = Clock()
    disp = dispatcher(db, clock, {"pacs": scp.destination()})
    ids = queue(disp.outbox, objects, "pacs", clock.t)
    assert [r.state for r in disp.outbox.rows()] == ["pending"] * len(objects)
    clock.t += 1

    report = disp.tick()

    assert report["pacs"].sent == len(objects) and report["pacs"].error is None
    rows = disp.outbox.rows()
    assert [r.id for r in rows] == ids
    assert all(r.state == "sent" and r.sent_at == clock.t and r.attempts == 1 for r in rows)
    received = {sop_uid(p): p for p in scp.received()}
    assert sorted(received) == sorted(r.sop_instance_uid for r in rows)
    for path in objects:
        assert dataset_bytes(received[sop_uid(path)]) == dataset_bytes(path)
    assert disp.tick() == {}  # nothing is due any more
    assert disp.outbox.counts() == {"pacs": {"sent": len(objects)}}


def test_adding_the_same_job_twice_adds_no_rows(db, objects):
    outbox = Outbox(db, POLICY)
    assert len(queue(outbox, objects, "pacs", 0.0)) == len(objects)
    assert queue(outbox, objects, "pacs", 1.0) == []
    assert len(outbox.rows()) == len(objects)
    with pytest.raises(ValueError, match="object kind"):
        outbox.add("job-2", "1.2.3", [NewObject("pacs", "dicom", "pdf", "x.pdf")])
    assert len(outbox.rows()) == len(objects)


def test_retries_with_growing_backoff_until_the_receiver_is_back(db, tmp_path, objects):
    clock = Clock()
    scp = StoreSCP(tmp_path / "late")
    disp = dispatcher(db, clock, {"pacs": scp.destination()})
    queue(disp.outbox, objects[:2], "pacs", clock.t)
    delays = []
    for attempt in range(1, 6):
        report = disp.tick()
        assert report["pacs"].retry == 2 and report["pacs"].sent == 0
        rows = disp.outbox.rows()
        assert all(r.state == "pending" and r.attempts == attempt for r in rows)
        assert all("no association" in r.last_error and "PACS" in r.last_error for r in rows)
        delay = rows[0].next_attempt_at - clock.t
        assert 0.8 * 5 * 2 ** (attempt - 1) <= delay <= 1.2 * 5 * 2 ** (attempt - 1)
        delays.append(delay)
        assert disp.tick() == {}  # not due before its time
        clock.t = max(r.next_attempt_at for r in rows)
    assert delays == sorted(delays)

    scp.start()
    try:
        report = disp.tick()
    finally:
        scp.stop()
    assert report["pacs"].sent == 2
    assert [r.state for r in disp.outbox.rows()] == ["sent", "sent"]
    assert scp.received_uids() == sorted(sop_uid(p) for p in objects[:2])


def test_backoff_is_capped():
    rng = random.Random(1)
    assert all(POLICY.delay(attempts, rng) <= 600 for attempts in range(100))
    assert POLICY.delay(30, rng) == 600


def test_a_refusing_destination_does_not_delay_another(db, scp, objects):
    clock = Clock()
    disp = dispatcher(db, clock, {"down": unused_destination(), "pacs": scp.destination()})
    queue(disp.outbox, objects, "down", clock.t)
    queue(disp.outbox, objects, "pacs", clock.t)

    report = disp.tick()

    assert report["pacs"].sent == len(objects)
    assert report["down"].retry == len(objects)
    assert {r.state for r in disp.outbox.rows(destination="pacs")} == {"sent"}
    assert {r.state for r in disp.outbox.rows(destination="down")} == {"pending"}
    assert len(scp.received()) == len(objects)


def test_a_silent_destination_does_not_hold_up_another(db, scp, objects):
    """A receiver that takes the connection and never answers costs its own timeout only."""
    clock = Clock()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete, nobody reads them
    finished: dict[str, float] = {}

    def timed(dest, paths):
        outcomes = send_dicom(dest, paths, CALLING_AE, timeout_s=3)
        finished[dest.ae_title] = time.monotonic()
        return outcomes

    destinations = {"a-silent": DicomDestination(kind="dicom", host="127.0.0.1",
                                               port=silent.getsockname()[1], ae_title="SILENT"),
                    "pacs": scp.destination()}
    disp = dispatcher(db, clock, destinations, senders={"dicom": timed})
    queue(disp.outbox, objects, "a-silent", clock.t)
    queue(disp.outbox, objects, "pacs", clock.t)
    try:
        started = time.monotonic()
        report = disp.tick()
    finally:
        silent.close()
    assert report["pacs"].sent == len(objects)
    assert report["a-silent"].retry == len(objects)
    assert finished["PACS"] - started < 2.5 <= finished["SILENT"] - started


def test_a_broken_sender_is_recorded_on_its_own_rows(db, scp, objects, tmp_path):
    clock = Clock()
    message = tmp_path / "oru.hl7"
    message.write_text("MSH|^~\\&|...\r", encoding="utf-8")

    def broken(dest, paths):
        raise ConnectionError("sender exploded")

    destinations = {"pacs": scp.destination(),
                    "ris": HL7Destination(kind="hl7", host="127.0.0.1", port=free_port())}
    senders = {"dicom": lambda d, p: send_dicom(d, p, CALLING_AE), "hl7": broken}
    disp = dispatcher(db, clock, destinations, senders=senders)
    queue(disp.outbox, objects[:1], "pacs", clock.t)
    disp.outbox.add("job-1", "1.2.3", [NewObject("ris", "hl7", "hl7", str(message))], clock.t)

    report = disp.tick()

    assert report["pacs"].sent == 1
    assert report["ris"].error == "ConnectionError: sender exploded"
    (row,) = disp.outbox.rows(destination="ris")
    assert row.state == "pending" and row.attempts == 1
    assert row.last_error == "ConnectionError: sender exploded"


def test_rows_past_the_maximum_age_are_dead_then_resent_with_the_same_uids(db, tmp_path,
                                                                           objects):
    clock = Clock()
    scp = StoreSCP(tmp_path / "pacs")
    disp = dispatcher(db, clock, {"pacs": scp.destination()})
    queue(disp.outbox, objects, "pacs", clock.t)
    disp.tick()
    assert {r.state for r in disp.outbox.rows()} == {"pending"}
    clock.t += POLICY.max_age_s

    report = disp.tick()

    assert report["pacs"].dead == len(objects)
    rows = disp.outbox.rows()
    assert {r.state for r in rows} == {"dead"}
    assert all(r.attempts == 2 and "no association" in r.last_error for r in rows)
    assert disp.tick() == {}

    clock.t += 10
    assert disp.outbox.resend_dead([rows[0].id], clock.t) == 1
    assert disp.outbox.resend_dead(now=clock.t) == len(objects) - 1
    assert all(r.state == "pending" and r.attempts == 0 for r in disp.outbox.rows())
    scp.start()
    try:
        report = disp.tick()
    finally:
        scp.stop()
    assert report["pacs"].sent == len(objects)
    assert scp.received_uids() == sorted(r.sop_instance_uid for r in rows)


def test_a_permanent_failure_is_dead_at_once(db, scp, objects, tmp_path):
    clock = Clock()
    disp = dispatcher(db, clock, {"pacs": scp.destination()})
    gone = tmp_path / "gone.dcm"
    disp.outbox.add("job-1", "1.2.3", [NewObject("pacs", "dicom", "sr", str(gone), "1.2.9")],
                    clock.t)
    queue(disp.outbox, objects[:1], "pacs", clock.t)

    report = disp.tick()

    assert (report["pacs"].sent, report["pacs"].dead) == (1, 1)
    dead = disp.outbox.rows(states=["dead"])
    assert [r.path for r in dead] == [str(gone)]
    assert dead[0].last_error.startswith("object file unreadable")


@pytest.mark.parametrize(("status", "state"), [
    (0x0000, SENT), (0x0001, SENT), (0xB000, SENT), (0xB007, SENT),
    (0xA700, RETRY), (0x0122, DEAD), (0x0124, RETRY), (0xA900, DEAD), (0xC000, DEAD),
    (0xC123, DEAD),
])
def test_cstore_status_rules(status, state):
    outcome = dicom_status_outcome(status)
    assert outcome.state == state
    assert outcome == Outcome(SENT) or f"0x{status:04X}" in outcome.reason


def test_restart_after_a_crash_sends_what_was_in_flight(tmp_path, scp, objects):
    """Rows left ``sending`` (one batch claimed and not yet sent, one sent but not yet
    marked) go out after a restart; the object sent twice keeps its SOP Instance UID."""
    clock = Clock()
    path = tmp_path / "state.db"
    first = StateDB(path)
    outbox = Outbox(first, POLICY)
    queue(outbox, objects, "pacs", clock.t)
    claimed = outbox.claim("pacs", clock.t, limit=len(objects))
    assert [r.state for r in claimed] == ["sending"] * len(objects)
    assert send_dicom(scp.destination(), [claimed[0].path], CALLING_AE)[0].state == SENT
    first.close()  # the crash: nothing marked

    second = StateDB(path)
    try:
        clock.t += 30
        disp = dispatcher(second, clock, {"pacs": scp.destination()})
        assert disp.tick() == {}  # sending rows are not due until recovered
        assert disp.recover() == len(objects)
        report = disp.tick()
        assert report["pacs"].sent == len(objects)
        assert {r.state for r in disp.outbox.rows()} == {"sent"}
    finally:
        second.close()
    uids = scp.received_uids()
    assert len(uids) == len(objects) + 1
    assert sorted(set(uids)) == sorted(sop_uid(p) for p in objects)
    assert uids.count(claimed[0].sop_instance_uid) == 2


def test_resend_study_requeues_its_sent_rows(db, scp, objects):
    clock = Clock()
    disp = dispatcher(db, clock, {"pacs": scp.destination()})
    queue(disp.outbox, objects[:2], "pacs", clock.t, study_uid="1.2.3")
    queue(disp.outbox, objects[2:], "pacs", clock.t, job_id="job-2", study_uid="1.2.4")
    disp.tick()
    clock.t += 60

    assert disp.outbox.resend_study("1.2.3", clock.t) == 2
    assert [r.state for r in disp.outbox.rows(study_uid="1.2.3")] == ["pending"] * 2
    assert {r.state for r in disp.outbox.rows(study_uid="1.2.4")} == {"sent"}
    report = disp.tick()

    assert report["pacs"].sent == 2
    uids = scp.received_uids()
    assert len(uids) == len(objects) + 2
    for path in objects[:2]:
        assert uids.count(sop_uid(path)) == 2


def oru(control_id: str) -> str:
    return (f"MSH|^~\\&|AIWORKER|RAD|RIS|HOSP|20240102080000||ORU^R01^ORU_R01|{control_id}|P"
            "|2.5.1||||||UNICODE UTF-8\rPID|1||PH1||O'BRIEN^SIOBHÁN\r")


def mllp_listener(reject: str) -> tuple[MllpReceiver, list[str]]:
    """An MLLP receiver on loopback: AR for messages containing ``reject``, else AA; it
    keeps the text of every message it got."""
    received: list[str] = []

    def answer(message: str) -> tuple[str, str]:
        received.append(message)
        return ("AR", "unknown order") if reject in message else ("AA", "")

    return MllpReceiver(answer), received


def test_hl7_rows_go_over_mllp(db, tmp_path):
    clock = Clock()
    server, received = mllp_listener(reject="CTRL2")
    messages = []
    for n in (1, 2, 3):
        path = tmp_path / f"oru{n}.hl7"
        path.write_text(oru(f"CTRL{n}"), encoding="utf-8")
        messages.append(path)
    destinations = {
        "ris": HL7Destination(kind="hl7", host="127.0.0.1", port=server.port),
        "down": HL7Destination(kind="hl7", host="127.0.0.1", port=free_port())}
    disp = dispatcher(db, clock, destinations, senders=default_senders(CALLING_AE, 5))
    for name in destinations:
        disp.outbox.add("job-1", "1.2.3", [NewObject(name, "hl7", "hl7", str(path))
                                           for path in messages], clock.t)
    try:
        report = disp.tick()
    finally:
        server.close()

    assert (report["ris"].sent, report["ris"].dead) == (2, 1)
    assert report["down"].retry == 3
    assert [(r.state, r.last_error) for r in disp.outbox.rows(destination="ris")] == [
        ("sent", None), ("dead", "AR from the receiver: unknown order"), ("sent", None)]
    assert received == [path.read_bytes().decode("utf-8") for path in messages]  # \r kept
    down = disp.outbox.rows(destination="down")
    assert all(r.state == "pending" and "cannot reach" in r.last_error for r in down)
