"""Receiving through real sockets: dcmtk's echoscu/storescu and ``aiworker send`` against the
node running as ``aiworker serve``."""

from __future__ import annotations

import re
import time

import pydicom
import pytest
from helpers.dicom import dataset_bytes
from helpers.tools import dcmtk, needs_dcmtk, wait_until


def storescu(node, *paths, options=("+sd", "+r"), calling="STORESCU", nodelay=True):
    return dcmtk("storescu", *options, "-aet", calling, "-aec", node.ae_title, "127.0.0.1",
                 str(node.port), *paths, nodelay=nodelay, timeout=120)


def assert_stored_exactly(node, study) -> None:
    """Every file of ``study`` is in the spool at its UID path with identical data set bytes."""
    for source in study.files:
        stored = study.spool_path(node.data_dir, source)
        assert stored.is_file(), f"{source} was not stored at {stored}"
        assert dataset_bytes(stored) == dataset_bytes(source), f"{stored} differs from {source}"
        meta = pydicom.filereader.read_file_meta_info(stored)
        assert meta.MediaStorageSOPInstanceUID == study.sop_uid[source]
        assert meta.TransferSyntaxUID == pydicom.filereader.read_file_meta_info(
            source).TransferSyntaxUID


@needs_dcmtk
def test_echoscu(node) -> None:
    proc = dcmtk("echoscu", "-v", "-aet", "ECHOTEST", "-aec", "AIWORKER", "127.0.0.1",
                 str(node.port))
    assert proc.returncode == 0, proc.stdout
    assert "Received Echo Response (Success)" in proc.stdout
    log = node.wait_for_log("C-ECHO from ECHOTEST")
    assert "association released: calling AE ECHOTEST" in node.wait_for_log(
        "association released: calling AE ECHOTEST")
    assert "Traceback" not in log


@needs_dcmtk
def test_echo_with_wrong_called_ae_is_rejected(node) -> None:
    proc = dcmtk("echoscu", "-aec", "NOTME", "127.0.0.1", str(node.port))
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stdout, proc.stdout
    # the node still answers its own title
    assert dcmtk("echoscu", "-aec", "AIWORKER", "127.0.0.1", str(node.port)).returncode == 0


def test_serve_prints_how_to_use_it(node) -> None:
    out = wait_until(lambda: "echoscu" in node.stdout_text() and node.stdout_text(), 5,
                     "the start-up banner")
    assert f"echoscu 127.0.0.1 {node.port} -aec AIWORKER" in out
    assert f"on 127.0.0.1:{node.port}" in out
    assert "listening: DICOM AE AIWORKER on 127.0.0.1" in node.wait_for_log("listening")


@needs_dcmtk
def test_a_dicom_port_in_use_stops_serve_with_one_clear_line(node, node_factory) -> None:
    second = node_factory("second", start=False, node={"port": node.port})
    proc = second.cli("serve", "--config", str(second.config_path))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"the DICOM port 127.0.0.1:{node.port} is in use by another process: stop it, or set "
        "node.port (AIWORKER_NODE__PORT)")


def test_store_study_with_storescu(node, make_study) -> None:
    study = make_study(series=3, slices=5)
    proc = storescu(node, study.root)
    assert proc.returncode == 0, proc.stdout

    assert_stored_exactly(node, study)
    assert len(node.spool_files()) == 15
    assert node.spool_temporaries() == []

    status = node.wait_study_complete(study.study_uid, 15, "the study to complete")
    assert status["instances"] == 15
    assert status["calling_ae"] == "STORESCU"
    assert status["completed_at"] is not None
    assert {s["series_uid"] for s in status["series"]} == set(study.series)
    assert len(status["series"]) == 3
    for series in status["series"]:
        assert series["instances"] == 5
        assert series["frames"] == 5
        assert series["expected_frames"] == 5
        assert series["state"] == "complete"
        assert series["closed_by"] == "expected_count"
        assert series["modality"] == "MR"
        assert series["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.4"
        files = study.series[series["series_uid"]]
        assert series["bytes"] == sum(
            study.spool_path(node.data_dir, f).stat().st_size for f in files)
    assert [s["series_number"] for s in status["series"]] == [1, 2, 3]

    # the DB points at the same files
    rows = node.sql("SELECT sop_uid, path, state, transfer_syntax, calling_ae FROM instances")
    assert len(rows) == 15
    for row in rows:
        assert row["state"] == "stored"
        assert row["transfer_syntax"] == "1.2.840.10008.1.2.1"
        assert row["calling_ae"] == "STORESCU"
        assert row["path"].endswith(f"/{row['sop_uid']}.dcm")
    assert {r["sop_uid"] for r in rows} == set(study.sop_uid.values())
    log = node.log_text()
    assert "statuses {'0x0000': 15}" in log
    assert log.count("series complete (expected count reached)") == 3


@needs_dcmtk
def test_status_human_readable(node, make_study) -> None:
    study = make_study(series=2, slices=3)
    assert storescu(node, study.root).returncode == 0
    proc = node.cli("status", "--config", str(node.config_path))
    assert proc.returncode == 0
    assert study.study_uid in proc.stdout
    assert "expected_count" in proc.stdout


@needs_dcmtk
def test_study_without_expected_count_completes_by_idle_timer(node_factory, make_study) -> None:
    stable = 3.0
    node = node_factory(completion={"series_stable_seconds": stable})
    study = make_study(series=2, slices=4, images_in_acquisition=False)
    sent = time.time()
    assert storescu(node, study.root).returncode == 0

    # right after the send, nothing can be complete: no expected count, timer not run out
    rows = node.sql("SELECT state, closed_by, expected_frames, instance_count FROM series")
    assert time.time() - sent < stable, "too slow to observe the receiving state"
    assert rows == [{"state": "receiving", "closed_by": None, "expected_frames": None,
                     "instance_count": 4}] * 2
    assert node.sql("SELECT state FROM studies") == [{"state": "receiving"}]
    status = node.study_status(study.study_uid)
    if time.time() - sent < stable:  # the CLI takes a moment to start
        assert status["state"] == "receiving"
        assert {s["state"] for s in status["series"]} == {"receiving"}
    assert status["instances"] == 8

    status = node.wait_study_complete(study.study_uid, stable + 10,
                                      "the idle timer to complete the study")
    for series in status["series"]:
        assert series["state"] == "complete"
        assert series["closed_by"] == "idle_timer"
        assert series["instances"] == 4
    rows = node.sql("SELECT last_received, completed_at, closed_by FROM series")
    assert all(r["completed_at"] - r["last_received"] >= stable for r in rows), rows
    assert "series complete (idle 3s)" in node.log_text()


@needs_dcmtk
def test_resend_after_completion_is_a_late_arrival(node, make_study) -> None:
    study = make_study(series=2, slices=3)
    assert storescu(node, study.root).returncode == 0
    wait_until(lambda: node.study_status(study.study_uid)["state"] == "complete", 15,
               "the study to complete")
    again = study.files[0]
    series_uid = study.series_of[again]
    assert storescu(node, again, options=()).returncode == 0

    [late] = wait_until(lambda: node.events("late_arrival"), 5, "a late_arrival event")
    assert late["series_uid"] == series_uid
    assert late["sop_uid"] == study.sop_uid[again]
    assert f"late arrival re-opens series {series_uid}" in node.log_text()
    status = wait_until(
        lambda: (s := node.study_status(study.study_uid))["state"] == "complete" and s,
        15, "the study to complete again")
    assert status["instances"] == 6
    by_uid = {s["series_uid"]: s for s in status["series"]}
    assert by_uid[series_uid]["instances"] == 3
    assert by_uid[series_uid]["state"] == "complete"
    assert len(node.sql("SELECT 1 FROM instances WHERE sop_uid = ?",
                        (study.sop_uid[again],))) == 1
    assert len(node.spool_files()) == 6


def test_aiworker_send_command(node, make_study) -> None:
    study = make_study(series=2, slices=3)
    (study.root / "README.txt").write_text("not DICOM")
    proc = node.cli("send", str(study.root), "127.0.0.1", str(node.port), "--called-ae", "AIWORKER",
                    "--calling-ae", "AIWCLI")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one file was not DICOM
    assert re.search(r"status 0x0000 \(success\): 6\b", proc.stdout), proc.stdout
    assert "not DICOM, skipped: 1" in proc.stdout
    assert f"    {study.root / 'README.txt'}" in proc.stdout.splitlines()
    assert_stored_exactly(node, study)
    rows = node.sql("SELECT DISTINCT calling_ae FROM instances")
    assert rows == [{"calling_ae": "AIWCLI"}]

    (study.root / "README.txt").unlink()
    proc = node.cli("send", str(study.root), "127.0.0.1", str(node.port), "--called-ae", "AIWORKER")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"status 0x0000 \(success\): 6\b", proc.stdout), proc.stdout
    assert node.instance_count() == 6


def test_aiworker_send_refuses_what_it_cannot_send(node, tmp_path) -> None:
    where = ("127.0.0.1", str(node.port))
    missing = node.cli("send", str(tmp_path / "nonexistent"), *where)
    assert (missing.returncode, missing.stderr.strip()) == \
        (1, f"send: {tmp_path / 'nonexistent'} does not exist")
    (tmp_path / "empty").mkdir()
    empty = node.cli("send", str(tmp_path / "empty"), *where)
    assert (empty.returncode, empty.stderr.strip()) == \
        (1, f"send: no files under {tmp_path / 'empty'}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not DICOM")
    notes = node.cli("send", str(tmp_path / "notes"), *where)
    assert notes.returncode == 1
    assert "send: none of the 1 file(s) under" in notes.stderr
    assert f"    {tmp_path / 'notes' / 'a.txt'}" in notes.stdout.splitlines()
    assert node.instance_count() == 0


def test_aiworker_echo_command(node) -> None:
    proc = node.cli("echo", "127.0.0.1", str(node.port), "--called-ae", "AIWORKER")
    assert proc.returncode == 0, proc.stderr
    assert "status 0x0000" in proc.stdout
    proc = node.cli("echo", "127.0.0.1", str(node.port), "--called-ae", "WRONGAE")
    assert proc.returncode == 1
    assert "rejected" in proc.stderr


@needs_dcmtk
def test_dcmtk_default_nagle_sender_gets_everything_through(node, make_study) -> None:
    """dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set; the node must cope.

    Only completeness is checked here, never timing.
    """
    study = make_study(series=1, slices=20)
    proc = storescu(node, study.root, nodelay=False)
    assert proc.returncode == 0, proc.stdout
    assert_stored_exactly(node, study)
    assert node.instance_count() == 20


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
@needs_dcmtk
def test_no_phi_in_logs(node_factory, make_study, level) -> None:
    node = node_factory(logging={"level": level})
    study = make_study(series=2, slices=3, seed=424242, patient_name="MÜLLER^Jörg")
    assert storescu(node, study.root, calling="MRI1").returncode == 0
    # an error path too: a rejected instance is logged with its SOP UID
    bad = study.root / "bad.dcm"
    ds = pydicom.dcmread(study.files[0])
    del ds.SeriesInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.save_as(bad, enforce_file_format=True)
    storescu(node, bad, options=())
    wait_until(lambda: node.study_status(study.study_uid)["state"] == "complete", 15,
               "the study to complete")
    # the state DB is where identifiers belong, decoded with the data set's character set
    assert node.sql("SELECT patient_name, patient_id, accession_number FROM studies") == [
        {"patient_name": "MÜLLER^Jörg", "patient_id": "PH424242",
         "accession_number": "ACC424242"}]
    node.stop()

    log = node.log_text() + node.stdout_text()
    assert "C-STORE refused" in log  # the error path was taken and logged
    assert study.study_uid in log or "series complete" in log  # the log does talk about it
    for phi in ("MÜLLER", "Jörg", "MULLER", "M\\xdcLLER", "J\\xf6rg", study.patient_id,
                "ACC424242"):
        assert phi not in log, f"{phi!r} leaked into the log"
    # digits-only PHI: look outside UIDs, which may contain any digit run by chance
    without_uids = re.sub(r"\d+(\.\d+)+", "<uid>", log)
    for phi in ("19800101", "1980-01-01"):
        assert phi not in without_uids, f"{phi!r} leaked into the log"
    assert study.patient_id == "PH424242"
