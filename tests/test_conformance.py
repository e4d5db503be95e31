"""The DICOM Conformance Statement (docs/conformance.md) and the HL7 interface specification
(docs/hl7.md) say what the code does.

* The generated tables render into the pages and list what the code lists: the storage SOP
  classes pynetdicom's unrestricted service accepts, the C-STORE statuses of
  :mod:`aiworker.receive.scp`, the result objects' SOP classes and transfer syntaxes.
* A real node (``aiworker serve``) accepts every SOP class of the SCP table in the first
  transfer syntax proposed, refuses what the statement says it refuses, and stores (or
  refuses with the status its note names) an instance in every transfer syntax of the
  stored table.
* The outbox's real association proposes exactly the SCU table's presentation contexts,
  and the objects written carry the SOP class, transfer syntax, character set and optional
  modules the statement gives.
* The ORU^R01 built for a phantom run has exactly the segments of docs/hl7.md, fills only
  fields it documents, and every OBX row it emits is documented with its value type and
  units.
"""

from __future__ import annotations

import re
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.results import MANIFEST, MODEL_ID, truth_run
from helpers.tools import REPO
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from aiworker.dispatch import mllp
from aiworker.dispatch.outbox import SENT, send_dicom
from aiworker.receive import scp
from aiworker.receive.dataset import part10_header
from aiworker.results.hl7 import build_oru
from aiworker.results.objects import write_results
from aiworker.results.patient import RESULT_CHARACTER_SET
from aiworker.results.report import SeriesInfo, report_text

sys.path.insert(0, str(REPO / "docs"))
import gen_conformance as gen  # noqa: E402  (the docs' generator, beside its pages)
import hooks  # noqa: E402

from aiworker.dispatch.requestor import associate  # noqa: E402

PRIVATE_SOP_CLASS = "1.3.6.1.4.1.9590.100.1.2.999"  # any private UID


def rendered(name: str) -> str:
    """A docs page with its generated markers replaced, as the MkDocs build does."""
    page = types.SimpleNamespace(file=types.SimpleNamespace(src_path=name))
    text = (REPO / "docs" / name).read_text(encoding="utf-8")
    return hooks.on_page_markdown(text, page, None, None)


def section_rows(page: str, heading: str) -> list[list[str]]:
    """The body rows (cells, stripped of backquotes) of the tables under ``heading``."""
    body = page.split(heading, 1)[1]
    body = re.split(r"\n#{2,3} ", body, maxsplit=1)[0]
    rows = []
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split(" | ")])
    return rows[1:] if rows else rows  # less the header


@pytest.fixture(scope="module")
def conformance() -> str:
    return rendered("conformance.md")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    return truth_run(tmp_path_factory.mktemp("phantom"), seed=31, matrix=48)


# --- the generated tables ----------------------------------------------------------------


def test_every_generated_table_is_on_the_pages(conformance: str) -> None:
    hl7_page = rendered("hl7.md")
    markers = set(hooks.MARKER.findall((REPO / "docs" / "conformance.md").read_text()))
    markers |= set(hooks.MARKER.findall((REPO / "docs" / "hl7.md").read_text()))
    assert markers == set(gen.GENERATED)
    assert "generated:" not in conformance and "generated:" not in hl7_page
    for uid in [*gen.storage_sop_classes(), Verification]:
        assert f"| `{uid}` |" in conformance, uid
    for uid in gen.stored_transfer_syntaxes():
        assert f"| `{uid}` |" in conformance, uid
    for code in gen.store_statuses():
        assert f"| 0x{code:04X} |" in conformance


def test_the_tables_are_the_codes_lists() -> None:
    from pynetdicom.sop_class import _STORAGE_CLASSES  # what negotiate_unrestricted uses

    assert set(gen.storage_sop_classes()) == set(_STORAGE_CLASSES.values())
    constants = {value for name, value in vars(scp).items() if name.isupper()
                 and isinstance(value, int) and 0xA000 <= value <= 0xCFFF}
    assert set(gen.store_statuses()) == constants | {0x0000}
    assert all(meaning for meaning in gen.store_statuses().values())
    assert set(gen.STORED_NOTES) <= {str(ts) for ts in gen.stored_transfer_syntaxes()}
    assert set(gen.SENT_OBJECTS) == {"seg", "sr", "sc"}  # config.DicomObject


# --- the SCP, through a real node --------------------------------------------------------


def _contexts(ae: AE, assoc) -> dict[tuple[str, tuple[str, ...]], str | None]:
    """(abstract syntax, proposed syntaxes) -> the accepted syntax, or None if rejected."""
    accepted = {cx.context_id: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    return {(str(cx.abstract_syntax), tuple(cx.transfer_syntax)): accepted.get(cx.context_id)
            for cx in assoc.requestor.requested_contexts}


def _associate(port: int, contexts: list[tuple[str, list[str]]]):
    ae = AE(ae_title="CONFTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = associate(ae, "127.0.0.1", port, ae_title="AIWORKER")
    assert assoc.is_established
    return ae, assoc


def _instance(ts: UID, folder: Path) -> Path:
    """A tiny MR image as a Part 10 file in ``ts``: native or encapsulated Pixel Data, none
    for the JPIP syntaxes (their pixels live at a provider URL), deflated as the syntax's
    name says."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "MR", 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    pixels = np.arange(16, dtype="<u2" if ts.is_little_endian else ">u2").tobytes()
    if "JPIP" in ts.name:
        ds.PixelDataProviderURL = "https://pacs.example.org/jpip"
    elif ts.is_encapsulated:
        ds.PixelData = encapsulate([pixels])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = ts.is_implicit_VR, ts.is_little_endian
    write_dataset(fp, ds)
    data = fp.getvalue()
    if ts.is_deflated or ("JPIP" in ts.name and "Deflate" in ts.name):
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
    path = folder / f"{ts}.dcm"
    path.write_bytes(part10_header(MRImageStorage, ds.SOPInstanceUID, ts) + data)
    return path


def test_a_real_node_negotiates_and_stores_as_the_statement_says(node_factory, tmp_path):
    node = node_factory(pipelines=[], storage={"fsync": False})
    verification = [str(ts) for ts in gen.verification_syntaxes()]
    probes = [(Verification, [ts]) for ts in verification]
    probes += [(Verification, [ExplicitVRBigEndian]),
               (StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian])]
    ae, assoc = _associate(node.port, probes)
    negotiated = _contexts(ae, assoc)
    assoc.release()
    assert [negotiated[(Verification, (ts,))] for ts in verification] == verification
    assert negotiated[(Verification, (ExplicitVRBigEndian,))] is None
    assert negotiated[(StudyRootQueryRetrieveInformationModelFind,
                       (ExplicitVRLittleEndian,))] is None

    classes = [*map(str, gen.storage_sop_classes()), PRIVATE_SOP_CLASS]
    for start in range(0, len(classes), 120):
        proposals = [(uid, [ImplicitVRLittleEndian, ExplicitVRLittleEndian][::1 - 2 * (n % 2)])
                     for n, uid in enumerate(classes[start:start + 120])]
        ae, assoc = _associate(node.port, proposals)
        negotiated = _contexts(ae, assoc)
        assoc.release()
        for uid, syntaxes in proposals:  # accepted, in the first syntax proposed
            assert negotiated[(uid, tuple(syntaxes))] == syntaxes[0], uid

    syntaxes = gen.stored_transfer_syntaxes()
    files = {ts: _instance(ts, tmp_path) for ts in syntaxes}
    ae, assoc = _associate(node.port, [(MRImageStorage, [str(ts)]) for ts in syntaxes])
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, as written
    try:
        statuses = {ts: int(assoc.send_c_store(path).Status) for ts, path in files.items()}
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    for ts in syntaxes:
        named = re.search(r"0x([0-9A-F]{4})", gen.STORED_NOTES.get(str(ts), ""))
        assert statuses[ts] == (int(named.group(1), 16) if named else 0x0000), ts.name
    assert len(node.spool_files()) == sum(1 for s in statuses.values() if s == 0)


# --- the SCU and the objects it sends ----------------------------------------------------


@pytest.fixture(scope="module")
def objects(run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = write_results(tmp_path_factory.mktemp("results"), run.paths, run.loaded,
                          run.labels, run.findings, MANIFEST, MODEL_ID, secondary_capture=True)
    return {"seg": files.seg, "sr": files.sr, "sc": files.sc}


def test_the_objects_are_what_the_statement_lists(objects: dict[str, Path]) -> None:
    from highdicom._standard_utils import get_module_attribute_map

    attributes = get_module_attribute_map()
    for kind, path in objects.items():
        ds = pydicom.dcmread(path)
        sop_class, syntax = gen.SENT_OBJECTS[kind]
        assert (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) == (sop_class, syntax), kind
        assert ds.SpecificCharacterSet == RESULT_CHARACTER_SET
        for _, module, usage in gen.iod_modules(kind):
            if usage == "M":
                continue
            tags = [tag_for_keyword(item["keyword"]) for item in attributes[module]
                    if not item["path"]]
            present = any(tag is not None and tag in ds for tag in tags)
            assert present == (module in gen.OPTIONAL_MODULES_WRITTEN[kind]), (kind, module)


def test_the_outbox_proposes_the_statements_contexts(objects: dict[str, Path]) -> None:
    requested, stored = [], []
    ae = AE(ae_title="PACS")
    for sop_class, _ in gen.SENT_OBJECTS.values():
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    handlers = [(evt.EVT_REQUESTED, lambda e: requested.extend(
                    (str(cx.abstract_syntax), list(cx.transfer_syntax))
                    for cx in e.assoc.requestor.requested_contexts)),
                (evt.EVT_C_STORE, lambda e: stored.append(e.request.AffectedSOPClassUID)
                 or 0x0000)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        pacs = types.SimpleNamespace(host="127.0.0.1", port=server.server_address[1],
                                     ae_title="PACS")
        outcomes = send_dicom(pacs, [str(p) for p in objects.values()], timeout_s=20)
    finally:
        server.shutdown()
    assert [o.state for o in outcomes] == [SENT] * 3
    expected = sorted((str(gen.SENT_OBJECTS[kind][0]), list(map(str, syntaxes)))
                      for kind, syntaxes in gen.scu_proposals().items())
    assert sorted(requested) == expected
    assert sorted(stored) == sorted(str(sop) for sop, _ in gen.SENT_OBJECTS.values())


# --- HL7 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oru(run) -> str:
    ds = pydicom.dcmread(run.paths[0])
    report = report_text(ds, SeriesInfo.from_dataset(ds), run.findings, MANIFEST)
    return build_oru(ds, run.findings, report, MANIFEST, MODEL_ID)


def _fields(segment: str) -> dict[int, str]:
    """Field number -> value of one ER7 segment (MSH-1 is the field separator)."""
    values = segment.split("|")
    offset = 1 if values[0] == "MSH" else 0
    return {n + offset: value for n, value in enumerate(values) if n and value}


def test_the_oru_has_the_documented_segments_and_fields(oru: str) -> None:
    page = rendered("hl7.md")
    segments = [line.split("|", 1)[0] for line in oru.rstrip("\r").split("\r")]
    documented = [row[0] for row in section_rows(page, "## Segments")]
    assert list(dict.fromkeys(segments)) == documented
    fields = {row[0] for row in section_rows(page, "## Fields")}
    for segment in oru.rstrip("\r").split("\r"):
        name = segment.split("|", 1)[0]
        for number in _fields(segment):
            assert f"{name}-{number}" in fields, f"{name}-{number} is filled, not documented"


def test_every_obx_row_is_documented_with_its_type_and_units(oru: str) -> None:
    rows = {row[0]: row for row in section_rows(rendered("hl7.md"), "## OBX rows")}
    emitted = {}
    for segment in oru.rstrip("\r").split("\r"):
        if segment.startswith("OBX|"):
            fields = _fields(segment)
            emitted[fields[3].split("^")[0]] = (fields[2], fields.get(6, ""))
    assert set(emitted) == set(rows)
    for identifier, (value_type, units) in emitted.items():
        assert rows[identifier][1] == value_type, identifier
        assert rows[identifier][4] == units, identifier


def test_the_mllp_framing_and_acks_are_the_documented_ones() -> None:
    page = rendered("hl7.md")
    assert (mllp.START, mllp.END) == (b"\x0b", b"\x1c\x0d")
    assert "0x0B" in page and "0x1C 0x0D" in page
    for code in mllp.OUTCOMES:
        assert f"| `{code}` |" in page
    example = page.split("```text\n", 1)[1].split("```", 1)[0]
    assert example.startswith("MSH|^~\\&|") and "\nOBX|1|CWE|ACL^" in example
    assert example.count("\nOBX|") >= 14
