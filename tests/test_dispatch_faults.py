"""The outbox under faults: a node killed mid-send to a one-association PACS, an HL7 ACK for
another message, a PACS that takes only MR images, and a PACS out of resources (0xA700).

Real parts: dcmtk storescp without --fork, pynetdicom storage SCPs, the MLLP receiver, a
dispatcher in its own process killed with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.tools import dcmtk_env, free_port, needs_dcmtk, port_open, wait_until
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage

from aiworker.config import DicomDestination, HL7Destination
from aiworker.dispatch.mllp import MllpReceiver
from aiworker.dispatch.outbox import Dispatcher, default_senders, send_dicom
from aiworker.store.db import StateDB
from aiworker.store.outbox import NewObject, Outbox, RetryPolicy

CALLING_AE = "AIWORKER"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def mr_file(path: Path, size: int = 64, study: str = "1.2.826.0.1.3680043.10.1") -> Path:
    """A small synthetic MR image (noise pixels) written as a Part 10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, study + ".1"
    ds.Modality, ds.PatientID = "MR", "FAULTS"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def seg_like(path: Path) -> Path:
    """An MR file relabelled as Segmentation Storage: enough to test the negotiation."""
    ds = pydicom.dcmread(mr_file(path))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.Modality = "SEG"
    ds.save_as(path, enforce_file_format=True)
    return path


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def queue(outbox: Outbox, files: list[Path], destination: str, now: float) -> list[int]:
    return outbox.add("job-1", "1.2.3", [
        NewObject(destination, "dicom", "seg" if "seg" in p.name else "sr", str(p), sop_uid(p))
        for p in files], now)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StateDB]:
    state = StateDB(tmp_path / "state.db")
    yield state
    state.close()


class PynetdicomSCP:
    """A pynetdicom storage SCP on a loopback port taking ``classes``, answering every
    C-STORE with ``status`` and keeping the SOP Instance UIDs it stored."""

    def __init__(self, classes: list[str], status: int = 0x0000):
        self.port, self.status, self.uids = free_port(), status, []
        ae = AE(ae_title="PACS")
        for sop_class in classes:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        if self.status == 0x0000:
            self.uids.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def destination(self) -> DicomDestination:
        return DicomDestination(kind="dicom", host="127.0.0.1", port=self.port,
                                ae_title="PACS", acse_timeout_s=5, dimse_timeout_s=5)

    def close(self) -> None:
        self.server.shutdown()


# -- 3: an HL7 ACK for another message -------------------------------------------------------

def oru(control_id: str) -> str:
    return (f"MSH|^~\\&|AIWORKER|RAD|RIS|HOSP|20240102080000||ORU^R01^ORU_R01|{control_id}|P"
            "|2.5.1||||||UNICODE UTF-8\rPID|1||PH1||DOE^JANE\r")


def test_an_ack_for_another_message_is_a_failed_attempt(db, tmp_path):
    clock = Clock()
    server = MllpReceiver(acked_id=lambda message: "CTRL0")  # AA, but for another message
    path = tmp_path / "oru.hl7"
    path.write_text(oru("CTRL7"), encoding="utf-8")
    destination = HL7Destination(kind="hl7", host="127.0.0.1", port=server.port)
    disp = Dispatcher(db, {"ris": destination}, default_senders(CALLING_AE), clock)
    disp.outbox.add("job-1", "1.2.3", [NewObject("ris", "hl7", "hl7", str(path))], clock.t)
    try:
        report = disp.tick()
    finally:
        server.close()
    assert (report["ris"].sent, report["ris"].retry) == (0, 1)
    [row] = disp.outbox.rows()
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.last_error == "ACK for control ID CTRL0, expected CTRL7"


# -- 4: a PACS that takes only MR images -----------------------------------------------------

def test_a_rejected_sop_class_is_dead_at_once_and_named_while_the_rest_goes(db, tmp_path):
    clock = Clock()
    pacs = PynetdicomSCP([MRImageStorage])
    mr, seg = mr_file(tmp_path / "mr.dcm"), seg_like(tmp_path / "seg.dcm")
    disp = Dispatcher(db, {"pacs": pacs.destination()},
                      {"dicom": lambda d, p: send_dicom(d, p, CALLING_AE)}, clock)
    queue(disp.outbox, [seg], "pacs", clock.t)  # alone: the PACS accepts no context at all
    queue(disp.outbox, [mr], "pacs", clock.t + 1)
    try:
        first = disp.tick()
        clock.t += 2
        second = disp.tick()
    finally:
        pacs.close()
    assert (first["pacs"].dead, second["pacs"].sent) == (1, 1)
    rows = {r.object_kind: r for r in disp.outbox.rows()}
    assert rows["seg"].state == "dead"
    assert rows["seg"].last_error == (
        "PACS rejected Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4)")
    assert rows["sr"].state == "sent"
    assert pacs.uids == [sop_uid(mr)]


def test_in_one_association_the_accepted_objects_go_and_the_rejected_one_dies(tmp_path):
    pacs = PynetdicomSCP([MRImageStorage])
    mr, seg = mr_file(tmp_path / "mr.dcm"), seg_like(tmp_path / "seg.dcm")
    try:
        outcomes = send_dicom(pacs.destination(), [str(seg), str(mr)], CALLING_AE)
    finally:
        pacs.close()
    assert [o.state for o in outcomes] == ["dead", "sent"]
    assert "Segmentation Storage" in outcomes[0].reason
    assert pacs.uids == [sop_uid(mr)]


# -- 5: out of resources, retried for the horizon --------------------------------------------

def test_default_backoff_doubles_to_a_15_minute_cap_for_24_hours():
    import random
    policy = RetryPolicy(jitter=0)
    delays = [policy.delay(n, random.Random(0)) for n in range(12)]
    assert delays[:8] == [5, 10, 20, 40, 80, 160, 320, 640]
    assert delays[8:] == [900] * 4
    assert policy.max_age_s == 24 * 3600


def test_out_of_resources_keeps_retrying_until_the_destination_s_horizon(db, tmp_path):
    clock = Clock()
    pacs = PynetdicomSCP([MRImageStorage], status=0xA700)
    path = mr_file(tmp_path / "mr.dcm")
    disp = Dispatcher(db, {"pacs": pacs.destination()},
                      {"dicom": lambda d, p: send_dicom(d, p, CALLING_AE)}, clock,
                      policy=RetryPolicy(), policies={"pacs": RetryPolicy(max_age_s=2 * 3600)})
    queue(disp.outbox, [path], "pacs", clock.t)
    start = clock.t
    try:
        for _ in range(9):  # 9 attempts: about 14 minutes, twice what once made it dead
            disp.tick()
            [row] = disp.outbox.rows()
            assert row.state == "pending", row.last_error
            assert row.next_attempt_at > clock.t
            clock.t = row.next_attempt_at
        assert row.last_error == "C-STORE status 0xA700"
        while clock.t - start < 2 * 3600:  # the horizon of this destination: 2 h
            disp.tick()
            [row] = disp.outbox.rows()
            assert row.next_attempt_at - clock.t <= 900 * 1.2 or row.state == "dead"
            clock.t = max(clock.t, row.next_attempt_at)
        disp.tick()
    finally:
        pacs.close()
    [row] = disp.outbox.rows()
    assert row.state == "dead" and row.attempts > 9


# -- 2: kill -9 mid-send to a one-association PACS -------------------------------------------

SENDER = textwrap.dedent("""
    import sys, time
    from aiworker.config import DicomDestination
    from aiworker.dispatch.outbox import Dispatcher, default_senders
    from aiworker.store.db import StateDB
    from aiworker.store.outbox import RetryPolicy
    db = StateDB(sys.argv[1])
    pacs = DicomDestination(kind="dicom", host="127.0.0.1", port=int(sys.argv[2]),
                            ae_title="PACS", acse_timeout_s=float(sys.argv[3]))
    disp = Dispatcher(db, {"pacs": pacs}, default_senders("AIWORKER"),
                      policy=RetryPolicy(base_s=1, cap_s=4), batch_size=64)
    print("recovered", disp.recover(), flush=True)
    while disp.outbox.rows(states=["pending", "sending"]):
        disp.tick()
        time.sleep(0.05)
    print("done", flush=True)
""")


def sender(state: Path, port: int, acse_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SENDER, str(state), str(port), str(acse_s)],
                            stdout=subprocess.PIPE, text=True)


PACS_DIMSE_TIMEOUT_S = 5  # storescp's; the frozen sender's association ends after it


@needs_dcmtk
@pytest.mark.parametrize("freeze", [False, True], ids=["kill", "half-open"])
def test_a_sender_killed_mid_send_to_a_one_association_pacs_delivers_after_restart(
        tmp_path, freeze):
    """storescp without --fork serves one association at a time. The sender is killed -9
    while sending (``half-open``: first frozen, so its association stays open and storescp
    waits on it until its own DIMSE timeout, as after a host crash); a restarted sender
    recovers the ``sending`` rows and everything arrives, each SOP Instance UID at least
    once."""
    files = [mr_file(tmp_path / f"mr{n:02d}.dcm", size=1024) for n in range(40)]
    state, pacs_dir, port = tmp_path / "state.db", tmp_path / "pacs", free_port()
    pacs_dir.mkdir()
    db = StateDB(state)
    queue(Outbox(db), files, "pacs", time.time())
    db.close()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), "+B", "+uf", "--acse-timeout", "5",
         "--dimse-timeout", str(PACS_DIMSE_TIMEOUT_S), str(port)], env=dcmtk_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 10, "storescp to listen")
        first = sender(state, port, 3)
        wait_until(lambda: len(list(pacs_dir.iterdir())) >= 2, 60, "the send to start")
        first.send_signal(signal.SIGSTOP if freeze else signal.SIGKILL)
        crashed = time.monotonic()
        second = sender(state, port, 3)  # the restarted node (the old one frozen or gone)
        assert second.stdout is not None
        assert int(second.stdout.readline().split()[1]) > 0  # rows left sending recovered
        if freeze:
            # a host gone for longer than the PACS's DIMSE timeout, then its socket closes
            time.sleep(PACS_DIMSE_TIMEOUT_S + 2)
            first.kill()
        first.wait(10)
        assert second.wait(180) == 0
        took = time.monotonic() - crashed
    finally:
        storescp.terminate()
        storescp.wait(10)
    how = "half-open" if freeze else "kill -9"
    print(f"\ndelivered everything {took:.1f} s after the crash ({how})")
    received = [sop_uid(p) for p in pacs_dir.iterdir()]
    assert set(received) == {sop_uid(p) for p in files}
    db = StateDB(state)
    assert {r.state for r in Outbox(db).rows()} == {"sent"}
    db.close()
    assert took < 120
