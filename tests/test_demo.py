"""``aiworker demo``: a phantom study through a throwaway node to a stand-in PACS (a
pynetdicom storage SCP) and RIS (an MLLP listener), all on real loopback sockets; the files
it prints are the ones that arrived."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pydicom
from helpers.tools import AIWORKER, free_port
from PIL import Image
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

DISCLAIMER = "Preliminary AI result, not verified by a radiologist, not for diagnostic use."


def demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
    env["COLUMNS"] = "200"  # no wrapped report lines or paths
    return subprocess.run([AIWORKER, "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def printed_path(stdout: str, label: str) -> Path:
    """The path printed after ``label ...: ``."""
    match = re.search(rf"^{re.escape(label)}[^\n]*?: (/\S+)$", stdout, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{stdout}"
    return Path(match.group(1))


def test_the_demo_shows_a_study_s_results_arriving_at_the_pacs_and_ris(tmp_path):
    done = demo("--workdir", str(tmp_path / "demo"), "--timeout", "180")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert DISCLAIMER in " ".join(out.replace("│", " ").split())
    assert "ACL" in out and "ACL finding: torn, probability" in out
    for stage in ("receive", "select wait", "job: model", "job: seg", "job: hl7", "send"):
        assert stage in out

    seg = printed_path(out, "SEG received by the PACS")
    sr = printed_path(out, "SR received by the PACS")
    hl7 = printed_path(out, "HL7 ORU^R01 received by the RIS")
    png = printed_path(out, "preview PNG (written by the node)")
    assert png.name == "preview.png" and png.parent.parent.name == "results"
    assert seg.parent == sr.parent == tmp_path / "demo" / "pacs"
    assert pydicom.dcmread(seg).SOPClassUID == SegmentationStorage
    assert pydicom.dcmread(sr).SOPClassUID == Comprehensive3DSRStorage
    message = hl7.read_text(encoding="utf-8")
    assert message.startswith("MSH|") and "ORU^R01" in message
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 200


def test_to_pushes_the_study_to_a_running_node(node_factory, tmp_path):
    node = node_factory()
    done = demo("--to", f"127.0.0.1:{node.port}", "--workdir", str(tmp_path / "push"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aiworker status" in done.stdout
    sent = len([p for p in (tmp_path / "push" / "study" / "dicom").rglob("*.dcm")])
    assert sent > 0 and node.instance_count() == sent


def test_to_a_node_that_is_down_fails_clearly(tmp_path):
    done = demo("--to", f"127.0.0.1:{free_port()}", "--workdir", str(tmp_path / "push"))
    assert done.returncode == 1
    assert "demo failed: sending the study to AIWORKER@127.0.0.1" in done.stderr
