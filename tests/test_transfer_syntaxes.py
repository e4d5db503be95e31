"""Every transfer syntax a sender uses is stored as received: same syntax, same data set bytes,
and pixels that decode to the original."""

from __future__ import annotations

import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.dicom import dataset_bytes, transfer_syntax
from helpers.tools import dcmtk, needs_dcmtk
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

pytestmark = needs_dcmtk


def _dcmtk_convert(tool: str, *options: str):
    def convert(source: Path, target: Path) -> None:
        proc = dcmtk(tool, *options, source, target)
        assert proc.returncode == 0, f"{tool} failed: {proc.stdout}"

    return convert


def _j2k_convert(source: Path, target: Path) -> None:
    ds = pydicom.dcmread(source)
    ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg encodes
    ds.save_as(target, enforce_file_format=True)


# name: (converter, storescu option proposing it, transfer syntax UID)
SYNTAXES = {
    "implicit-vr-le": (_dcmtk_convert("dcmconv", "+ti"), "-xi", ImplicitVRLittleEndian),
    "deflated": (_dcmtk_convert("dcmconv", "+td"), "-xd", DeflatedExplicitVRLittleEndian),
    "jpeg-lossless-sv1": (_dcmtk_convert("dcmcjpeg", "+e1"), "-xs", JPEGLosslessSV1),
    "jpeg-ls-lossless": (_dcmtk_convert("dcmcjpls", "+el"), "-xt", JPEGLSLossless),
    "rle": (_dcmtk_convert("dcmcrle"), "-xr", RLELossless),
    "jpeg2000-lossless": (_j2k_convert, "-xv", JPEG2000Lossless),
}


def _logical_bytes(path: Path) -> bytes:
    """The data set bytes; for deflated files, inflated (the deflate stream itself may differ
    between encoders that produce the same data set)."""
    raw = dataset_bytes(path)
    if transfer_syntax(path) == DeflatedExplicitVRLittleEndian:
        return zlib.decompress(raw, -zlib.MAX_WBITS)
    return raw


@pytest.fixture
def series_in(make_study, tmp_path: Path):
    """``series_in(name)``: one 2-slice series converted to the named syntax, plus originals."""

    def make(name: str) -> tuple[list[Path], list[Path]]:
        convert, _option, uid = SYNTAXES[name]
        study = make_study(name=f"orig-{name}", series=1, slices=2)
        folder = tmp_path / name
        folder.mkdir()
        converted = []
        for source in study.files:
            target = folder / source.name
            convert(source, target)
            assert transfer_syntax(target) == uid, f"{target} is not {uid.name}"
            converted.append(target)
        return study.files, converted

    return make


@pytest.mark.parametrize("name", list(SYNTAXES))
def test_storescu_transfer_syntax_is_kept(node, series_in, name: str) -> None:
    _convert, option, uid = SYNTAXES[name]
    originals, converted = series_in(name)
    proc = dcmtk("storescu", "-v", option, "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 *converted, timeout=60)
    assert proc.returncode == 0, proc.stdout
    # storescu sent them as they were, it did not convert to another syntax
    assert proc.stdout.count("Received Store Response (Success)") == len(converted), proc.stdout
    for source, target in re.findall(r"Converting transfer syntax: (.+?) -> (.+)", proc.stdout):
        assert source.strip() == target.strip(), f"storescu transcoded {source} -> {target}"

    rows = {r["sop_uid"]: r for r in node.sql("SELECT sop_uid, path, transfer_syntax "
                                              "FROM instances")}
    assert len(rows) == len(converted)
    for original, sent in zip(originals, converted, strict=True):
        sop_uid = str(pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID)
        stored = Path(rows[sop_uid]["path"])
        assert rows[sop_uid]["transfer_syntax"] == uid
        assert transfer_syntax(stored) == uid
        assert _logical_bytes(stored) == _logical_bytes(sent)
        if name != "deflated":
            assert dataset_bytes(stored) == dataset_bytes(sent)
        decoded = pydicom.dcmread(stored).pixel_array
        expected = pydicom.dcmread(original).pixel_array
        assert decoded.dtype == expected.dtype
        assert np.array_equal(decoded, expected)


def test_aiworker_send_keeps_every_syntax(node, series_in, tmp_path: Path) -> None:
    """``aiworker send`` proposes each file's own syntax; the node stores each as sent."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    sent: dict[str, tuple[Path, str]] = {}
    for name, (_c, _o, uid) in SYNTAXES.items():
        _originals, converted = series_in(name)
        for path in converted:
            copy = folder / f"{name}-{path.name}"
            shutil.copy(path, copy)
            sop = str(pydicom.dcmread(copy, stop_before_pixels=True).SOPInstanceUID)
            sent[sop] = (copy, uid)
    proc = node.cli("send", str(folder), "127.0.0.1", str(node.port), "--called-ae", "AIWORKER")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"status 0x0000 (success): {len(sent)}" in proc.stdout
    rows = {r["sop_uid"]: r for r in node.sql("SELECT sop_uid, path, transfer_syntax "
                                              "FROM instances WHERE state = 'stored'")}
    assert set(rows) == set(sent)
    for sop, (path, uid) in sent.items():
        stored = Path(rows[sop]["path"])
        assert rows[sop]["transfer_syntax"] == uid
        assert transfer_syntax(stored) == uid
        assert _logical_bytes(stored) == _logical_bytes(path), f"{path.name} ({uid.name})"
