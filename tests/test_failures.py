"""What the node answers when it cannot store, and how it recovers from a crash."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.dicom import dataset_bytes, raw_echo, raw_store, split_part10
from helpers.tools import dcmtk, dcmtk_env, needs_dcmtk, wait_until

from aiworker.receive import scp


def stored_sops(node) -> set[str]:
    return {r["sop_uid"] for r in node.sql("SELECT sop_uid FROM instances WHERE state='stored'")}


# --- out of resources ----------------------------------------------------------------------


@needs_dcmtk
def test_disk_below_floor_answers_a700_and_stores_nothing(node_factory, make_study) -> None:
    node = node_factory(storage={"min_free_mb": 10**9})
    study = make_study(series=1, slices=2)

    proc = dcmtk("storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 study.files[0])
    assert "Received Store Response (Refused: OutOfResources)" in proc.stdout, proc.stdout

    [response] = raw_store(node.port, [study.files[1]])
    assert response.Status == 0xA700
    assert "min_free_mb" in response.ErrorComment

    assert node.spool_files() == []
    assert node.spool_temporaries() == []
    assert node.instance_count() == 0
    status = node.status_json()
    assert status["studies"] == []
    # status shows the operator why nothing arrived
    refused = [p for p in status["problems"] if p["kind"] == "store_failed"]
    assert [p["status"] for p in refused] == ["0xA700", "0xA700"]
    assert {p["sop_uid"] for p in refused} == {study.sop_uid[f] for f in study.files}
    events = wait_until(lambda: len(node.events("store_failed")) == 2 and
                        node.events("store_failed"), 5, "two store_failed events")
    assert {e["detail"]["status"] for e in events} == {"0xA700"}
    assert {e["sop_uid"] for e in events} == {study.sop_uid[f] for f in study.files}
    log = node.log_text()
    assert "0xA700" in log
    # still alive and answering
    assert raw_echo(node.port) == 0x0000
    assert node.running


# --- undecodable and incomplete data sets -----------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_error_codes_are_those_documented() -> None:
    doc = scp.__doc__
    for code, name in [(0xA700, "OUT_OF_RESOURCES"), (0xC210, "CANNOT_DECODE"),
                       (0xC211, "BAD_UIDS"), (0xC212, "UID_MISMATCH"),
                       (0xC213, "WRITE_FAILED"), (0xC214, "DB_FAILED")]:
        assert getattr(scp, name) == code
        assert f"0x{code:04X}" in doc


def test_garbage_data_set_is_refused_as_undecodable(node, make_study, tmp_path: Path) -> None:
    study = make_study(series=1, slices=2)
    meta, _body = split_part10(study.files[0].read_bytes())
    garbage = np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    bad = _write(tmp_path / "garbage.dcm", meta + garbage)

    responses = raw_store(node.port, [bad, study.files[1]])
    assert 0xC000 <= responses[0].Status <= 0xCFFF
    assert responses[1].Status == 0x0000  # the same association goes on working
    assert stored_sops(node) == {study.sop_uid[study.files[1]]}
    assert len(node.spool_files()) == 1
    assert node.spool_temporaries() == []
    [event] = wait_until(lambda: node.events("store_failed"), 5, "a store_failed event")
    assert event["sop_uid"] == study.sop_uid[study.files[0]]
    assert raw_echo(node.port) == 0x0000  # and new associations too
    # the documented status for a data set that cannot be decoded
    assert responses[0].Status == scp.CANNOT_DECODE, (
        f"0x{responses[0].Status:04X} {responses[0].get('ErrorComment')}")


def test_truncated_data_set_is_refused_and_keeps_good_copy(node, make_study,
                                                           tmp_path: Path) -> None:
    """A data set cut short (Pixel Data shorter than its length says) is not an image: the
    node must not answer success for it, store it, or let it replace a good copy."""
    study = make_study(series=1, slices=2)
    good, fresh = study.files
    cut = {}
    for source in (good, fresh):
        meta, body = split_part10(source.read_bytes())
        cut[source] = _write(tmp_path / f"truncated-{source.name}", meta + body[:-1000])

    [stored_good] = raw_store(node.port, [good])
    assert stored_good.Status == 0x0000
    stored = study.spool_path(node.data_dir, good)
    assert dataset_bytes(stored) == dataset_bytes(good)

    over_good, new_sop = raw_store(node.port, [cut[good], cut[fresh]])

    # the good copy received earlier is still what the spool holds and the DB describes
    assert dataset_bytes(stored) == dataset_bytes(good), "a truncated resend replaced it"
    assert np.array_equal(pydicom.dcmread(stored).pixel_array,
                          pydicom.dcmread(good).pixel_array)
    [row] = node.sql("SELECT size FROM instances WHERE sop_uid = ?", (study.sop_uid[good],))
    assert row["size"] == stored.stat().st_size
    # nothing was stored for the truncated instance that had no good copy
    assert not study.spool_path(node.data_dir, fresh).exists()
    assert stored_sops(node) == {study.sop_uid[good]}
    assert node.spool_temporaries() == []
    for response in (over_good, new_sop):
        assert response.Status == scp.CANNOT_DECODE, f"got 0x{response.Status:04X}"
    assert raw_echo(node.port) == 0x0000


def test_missing_series_uid_is_c211(node, make_study, tmp_path: Path) -> None:
    study = make_study(series=1, slices=2)
    ds = pydicom.dcmread(study.files[0])
    del ds.SeriesInstanceUID
    bad = tmp_path / "no-series.dcm"
    ds.save_as(bad, enforce_file_format=True)

    responses = raw_store(node.port, [bad, study.files[1]])
    assert responses[0].Status == scp.BAD_UIDS
    assert "SeriesInstanceUID" in responses[0].ErrorComment
    assert responses[1].Status == 0x0000
    assert stored_sops(node) == {study.sop_uid[study.files[1]]}
    assert not list(node.spool.rglob(f"{study.sop_uid[study.files[0]]}.dcm"))
    assert node.spool_temporaries() == []
    [event] = wait_until(lambda: node.events("store_failed"), 5, "a store_failed event")
    assert event["detail"]["status"] == "0xC211"
    assert event["sop_uid"] == study.sop_uid[study.files[0]]
    assert "C-STORE refused from RAWSCU: 0xC211" in node.log_text()


def test_malformed_uid_is_c211(node, make_study, tmp_path: Path) -> None:
    study = make_study(series=1, slices=1)
    ds = pydicom.dcmread(study.files[0])
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.StudyInstanceUID = "1.2.3.abc"
    bad = tmp_path / "bad-uid.dcm"
    ds.save_as(bad, enforce_file_format=True)
    [response] = raw_store(node.port, [bad])
    assert response.Status == scp.BAD_UIDS
    assert node.spool_files() == []
    assert node.spool_temporaries() == []


def test_sop_uid_differing_from_command_is_c212(node, make_study, tmp_path: Path) -> None:
    study = make_study(series=1, slices=1)
    ds = pydicom.dcmread(study.files[0])
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"  # raw_store puts this in the command
    bad = tmp_path / "mismatch.dcm"
    ds.save_as(bad)  # (enforce_file_format=True would copy SOPInstanceUID into the meta)
    assert pydicom.filereader.read_file_meta_info(bad).MediaStorageSOPInstanceUID == "1.2.3.4.5.6"
    [response] = raw_store(node.port, [bad])
    assert response.Status == scp.UID_MISMATCH
    assert node.spool_files() == []
    assert node.spool_temporaries() == []
    assert node.instance_count() == 0


# --- crash in the middle of a transfer --------------------------------------------------------


@needs_dcmtk
def test_kill_9_mid_transfer_then_restart_and_resend(node_factory, make_study) -> None:
    node = node_factory(completion={"series_stable_seconds": 2.0})
    study = make_study(series=3, slices=60, size=256)
    total = len(study.files)

    sender = subprocess.Popen(
        ["storescu", "+sd", "+r", "-aec", node.ae_title, "127.0.0.1", str(node.port),
         str(study.root)],
        env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: node.instance_count() >= 10, 30, "some instances to arrive",
                   interval=0.005)
        node.kill9()
        at_kill = node.instance_count()
        out, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.send_signal(signal.SIGKILL)
            sender.wait()
    assert at_kill < total, "the transfer finished before the kill; make it bigger"
    assert sender.returncode != 0, out  # storescu saw the node die

    node.start()
    node.wait_for_log("reconcile: ")
    assert node.spool_temporaries() == []
    files = node.spool_files()
    assert files, "nothing survived the crash"
    rows = node.sql("SELECT sop_uid, path, state, size FROM instances")
    by_path = {r["path"]: r for r in rows}
    for path in files:  # every file on disk is whole, readable and indexed
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.shape == (256, 256)
        assert dataset_bytes(path) == dataset_bytes(
            next(f for f in study.files if study.sop_uid[f] == ds.SOPInstanceUID))
        row = by_path[str(path)]
        assert row["state"] == "stored"
        assert row["sop_uid"] == ds.SOPInstanceUID
        assert row["size"] == path.stat().st_size
    for row in rows:  # every row the DB calls stored has its file
        if row["state"] == "stored":
            assert Path(row["path"]).is_file(), row
    assert len(files) == len([r for r in rows if r["state"] == "stored"])

    proc = subprocess.run(
        ["storescu", "+sd", "+r", "-aec", node.ae_title, "127.0.0.1", str(node.port),
         str(study.root)], env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    status = wait_until(
        lambda: (s := node.study_status(study.study_uid)) and s["state"] == "complete" and s,
        20, "the resent study to complete")
    assert status["instances"] == total
    assert sorted(s["instances"] for s in status["series"]) == [60, 60, 60]
    assert {s["state"] for s in status["series"]} == {"complete"}
    rows = node.sql("SELECT sop_uid, state FROM instances")
    assert len(rows) == total
    assert {r["sop_uid"] for r in rows} == set(study.sop_uid.values())
    assert {r["state"] for r in rows} == {"stored"}
    assert len(node.spool_files()) == total
    assert node.spool_temporaries() == []
    for source in study.files:
        assert dataset_bytes(study.spool_path(node.data_dir, source)) == dataset_bytes(source)


def test_restart_keeps_state_and_completes_pending_series(node_factory, make_study) -> None:
    """A series still receiving when the node stops completes after restart by the idle rule."""
    node = node_factory(completion={"series_stable_seconds": 30.0})
    study = make_study(series=1, slices=3, images_in_acquisition=False)
    assert all(r.Status == 0 for r in raw_store(node.port, study.files))
    assert node.study_status(study.study_uid)["state"] == "receiving"
    node.stop()
    # the data is old enough to be stable when the node comes back with a short timer
    past = time.time() - 60
    conn = sqlite3.connect(node.db_path)
    with conn:
        conn.execute("UPDATE series SET last_received = ?", (past,))
        conn.execute("UPDATE studies SET last_received = ?", (past,))
    conn.close()
    node.reconfigure(completion={"series_stable_seconds": 1.0})
    node.start()
    status = wait_until(
        lambda: (s := node.study_status(study.study_uid))["state"] == "complete" and s,
        10, "the pending study to complete after restart")
    assert status["instances"] == 3
    assert status["series"][0]["closed_by"] == "idle_timer"


def test_clean_restart_keeps_everything(node, make_study) -> None:
    study = make_study(series=2, slices=3)
    assert all(r.Status == 0 for r in raw_store(node.port, study.files))
    before = wait_until(
        lambda: (s := node.study_status(study.study_uid))["state"] == "complete"
        and s.get("selection") and s,
        15, "the study to complete and be selected")
    node.restart()
    # the banner is logged just after the port opens, which is when restart() returns
    wait_until(lambda: node.log_text().count("listening: DICOM AE AIWORKER") == 2, 10,
               "the restarted node's banner")
    assert "reconcile: ReconcileReport(temporaries_removed=0, marked_missing=0, indexed=0, " \
        "quarantined=0)" in node.log_text()
    assert node.study_status(study.study_uid) == before
    assert node.events("reconcile") == []
    # and it goes on receiving
    assert raw_echo(node.port) == 0x0000


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_node_stops_cleanly_on_signal(node, signum) -> None:
    node.proc.send_signal(signum)
    assert node.proc.wait(10) == 0
    assert "stopping" in node.log_text()
    assert "Traceback" not in node.log_text()


def test_port_in_use_is_a_clear_error(node_factory) -> None:
    """A second node on a taken port exits 1 and says why, without a traceback."""
    first = node_factory("first")
    second = node_factory("second", start=False)
    second.reconfigure(node={"port": first.port})
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    log = second.log_text()
    assert f"the DICOM port 127.0.0.1:{first.port} is in use by another process" in log
    assert "set node.port (AIWORKER_NODE__PORT)" in log
    assert "Traceback" not in log


def test_unusable_data_dir_is_a_clear_error(node_factory, tmp_path) -> None:
    """A data dir that cannot be created stops the start with one line, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    node = node_factory("blocked", start=False)
    node.reconfigure(storage={"data_dir": str(blocker / "var")})
    with pytest.raises(RuntimeError, match="exited with 1"):
        node.start()
    log = node.log_text()
    assert f"cannot open the data dir {blocker / 'var'}" in log
    assert "Traceback" not in log
