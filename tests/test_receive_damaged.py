"""A damaged resend of an instance already stored never replaces the good copy: it is
answered with its failure status, the good copy stays in the spool and the state DB as it
was, and the refusal is recorded (``store_failed`` with ``kept_stored_copy``). A complete
resend with different bytes replaces the stored copy. The spool reads every file back."""

from __future__ import annotations

import errno
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from helpers.dicom import dataset_bytes, raw_store, split_part10
from helpers.tools import wait_until

from aiworker.dispatch.requestor import associate
from aiworker.receive import scp
from aiworker.store.spool import Spool


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _edited(source: Path, path: Path, change) -> Path:
    ds = pydicom.dcmread(source)
    change(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def damaged_copies(source: Path, tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """Damaged versions of ``source`` (same SOP Instance UID) and the status each must get."""
    meta, body = split_part10(source.read_bytes())
    return {
        "cut_to_3000_bytes": (_write(tmp_path / "cut.dcm", meta + body[:3000]),
                              scp.CANNOT_DECODE),
        "cut_after_the_uids": (_write(tmp_path / "cut-late.dcm", meta + body[:1600]),
                               scp.CANNOT_DECODE),
        "pixel_data_short": (_edited(source, tmp_path / "short.dcm",
                                     lambda ds: setattr(ds, "Rows", ds.Rows * 2)),
                             scp.CANNOT_DECODE),
        "no_pixel_data": (_edited(source, tmp_path / "nopixels.dcm",
                                  lambda ds: delattr(ds, "PixelData")), scp.NOT_SOP_CLASS),
    }


def test_damaged_resends_keep_the_good_copy(node, make_study, tmp_path: Path) -> None:
    study = make_study(series=1, slices=1, size=256)  # a ~133 kB slice
    [good] = study.files
    sop = study.sop_uid[good]
    [first] = raw_store(node.port, [good])
    assert first.Status == 0x0000
    stored = study.spool_path(node.data_dir, good)
    assert dataset_bytes(stored) == dataset_bytes(good)
    [row_before] = node.sql("SELECT * FROM instances WHERE sop_uid = ?", (sop,))

    cases = damaged_copies(good, tmp_path)
    responses = raw_store(node.port, [path for path, _ in cases.values()])

    for (name, (_, status)), response in zip(cases.items(), responses, strict=True):
        assert response.Status == status, f"{name}: 0x{response.Status:04X}"
        assert str(response.ErrorComment).strip(), name
    assert dataset_bytes(stored) == dataset_bytes(good), "a damaged resend replaced it"
    assert node.sql("SELECT * FROM instances WHERE sop_uid = ?", (sop,)) == [row_before]
    assert node.spool_files() == [stored]
    assert node.spool_temporaries() == []
    events = wait_until(lambda: len(node.events("store_failed")) == len(cases) and
                        node.events("store_failed"), 5, "a store_failed event per resend")
    for event in events:
        assert event["sop_uid"] == sop
        assert event["detail"]["kept_stored_copy"] is True
        assert event["study_uid"] == study.study_uid
        assert event["series_uid"] == study.series_of[good]
    assert "the copy stored before is kept" in node.log_text()


def test_damaged_first_send_records_no_kept_copy(node, make_study, tmp_path: Path) -> None:
    study = make_study(series=1, slices=1)
    meta, body = split_part10(study.files[0].read_bytes())
    [response] = raw_store(node.port, [_write(tmp_path / "cut.dcm", meta + body[:-10])])
    assert response.Status == scp.CANNOT_DECODE
    [event] = wait_until(lambda: node.events("store_failed"), 5, "a store_failed event")
    assert event["detail"]["kept_stored_copy"] is False
    assert node.spool_files() == []


def test_complete_different_resend_replaces_the_stored_copy(node, make_study,
                                                            tmp_path: Path) -> None:
    study = make_study(series=1, slices=2)
    first, other = study.files
    assert [r.Status for r in raw_store(node.port, study.files)] == [0x0000, 0x0000]
    changed = _edited(first, tmp_path / "changed.dcm",
                      lambda ds: setattr(ds, "ImageComments", "resent with a comment"))
    assert dataset_bytes(changed) != dataset_bytes(first)

    [response] = raw_store(node.port, [changed])

    assert response.Status == 0x0000
    stored = study.spool_path(node.data_dir, first)
    assert dataset_bytes(stored) == dataset_bytes(changed)
    [row] = node.sql("SELECT size, state FROM instances WHERE sop_uid = ?",
                     (study.sop_uid[first],))
    assert row == {"size": stored.stat().st_size, "state": "stored"}
    assert len(node.spool_files()) == 2
    assert node.events("store_failed") == []


class _CorruptingSpool(Spool):
    """A spool on a "disk" that flips one byte of every file it writes."""

    def _create(self, temp: Path):
        handle = super()._create(temp)
        write = handle.write

        def corrupt(chunk) -> int:
            data = bytearray(chunk)
            data[len(data) // 2] ^= 0xFF
            return write(bytes(data))

        handle.write = corrupt
        return handle


@pytest.mark.parametrize("fsync", [True, False])
def test_spool_refuses_a_file_that_does_not_read_back(tmp_path: Path, fsync: bool) -> None:
    spool = _CorruptingSpool(tmp_path / "spool", fsync=fsync)
    with pytest.raises(OSError) as raised:
        spool.write_temporary([b"header", memoryview(b"data set bytes" * 100)])
    assert raised.value.errno == errno.EIO
    assert list(spool.temporary_files()) == []
    good = Spool(tmp_path / "good", fsync=fsync)
    temp, size = good.write_temporary([b"header", memoryview(b"data set bytes" * 100)])
    assert temp.read_bytes() == b"header" + b"data set bytes" * 100 and size == 1406


def test_state_db_locked_is_c214_with_a_comment(node_factory, make_study) -> None:
    """The state DB held by another writer past its busy timeout (state.busy_timeout_s, 1 s
    here): the instance cannot be recorded (0xC214) and neither can the refusal; the answer
    still names the node's code and reason (a handler that raised would give pynetdicom's
    own 0xC211, no comment)."""
    node = node_factory(state={"busy_timeout_s": 1})
    study = make_study(series=1, slices=1)
    blocker = sqlite3.connect(node.db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        response = _store_waiting(node.port, study.files[0], 60)
        waited = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert response.Status == scp.DB_FAILED, f"0x{response.Status:04X}"
    assert "state DB error" in response.ErrorComment
    assert "cannot record the refusal in the state DB" in node.log_text()
    assert 1.0 <= waited < 10.0, f"answered after {waited:.2f} s, not after state.busy_timeout_s"
    [again] = raw_store(node.port, study.files)  # once the DB is free, the resend is stored
    assert again.Status == 0x0000
    assert node.instance_count() == 1


def _store_waiting(port: int, path: Path, seconds: float):
    """C-STORE one file, waiting up to ``seconds`` for the answer (the node's DB waits out
    its busy timeout once per write that wants it)."""
    from pynetdicom import AE

    ae = AE(ae_title="RAWSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = seconds
    ds = pydicom.dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = associate(ae, "127.0.0.1", port, ae_title="AIWORKER")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()
