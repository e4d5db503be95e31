"""The allow-list (node.allowed_callers): who may associate, and how others are turned away."""

from __future__ import annotations

import pytest
from helpers.tools import dcmtk, needs_dcmtk, wait_until

from aiworker.config import AllowedCaller
from aiworker.dispatch.requestor import associate
from aiworker.receive.access import AllowList


def echoscu(node, calling: str):
    return dcmtk("echoscu", "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port))


@needs_dcmtk
def test_allow_list_by_ae_title(node_factory, make_study) -> None:
    node = node_factory(node={"allowed_callers": [{"ae_title": "GOODSCU"}]})

    bad = echoscu(node, "BADSCU")
    assert bad.returncode != 0
    log = node.wait_for_log("association rejected")
    [line] = [line for line in log.splitlines() if "association rejected" in line]
    assert "BADSCU" in line and "127.0.0.1" in line
    [event] = wait_until(lambda: node.events("association_rejected"), 5, "the rejection event")
    assert event["detail"]["calling_ae"] == "BADSCU"
    assert event["detail"]["address"] == "127.0.0.1"
    assert "C-ECHO from BADSCU" not in node.log_text()
    [problem] = node.status_json()["problems"]
    assert (problem["kind"], problem["calling_ae"]) == ("association_rejected", "BADSCU")

    good = echoscu(node, "GOODSCU")
    assert good.returncode == 0, good.stdout
    node.wait_for_log("C-ECHO from GOODSCU")

    # a rejected caller cannot store either
    study = make_study(series=1, slices=2)
    store = dcmtk("storescu", "-aet", "BADSCU", "-aec", node.ae_title, "127.0.0.1",
                  str(node.port), *study.files)
    assert store.returncode != 0
    assert node.spool_files() == []
    assert node.instance_count() == 0
    assert len(node.events("association_rejected")) == 2


@needs_dcmtk
def test_rejection_is_an_a_associate_rj_calling_ae_not_recognised(node_factory) -> None:
    """Callers must get a real A-ASSOCIATE-RJ (rejected-permanent, service user, calling AE
    title not recognised), not a dropped connection they would retry or misreport."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = node_factory(node={"allowed_callers": [{"ae_title": "GOODSCU"}]})
    outcomes = []
    for _ in range(3):
        ae = AE(ae_title="BADSCU")
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        assoc = associate(ae, "127.0.0.1", node.port, ae_title=node.ae_title)
        reply = assoc.acceptor.primitive
        outcomes.append((assoc.is_rejected, assoc.is_aborted,
                         None if reply is None else (reply.result, reply.result_source,
                                                     reply.diagnostic)))
    assert outcomes == [(True, False, (0x01, 0x01, 0x03))] * 3

    proc = echoscu(node, "BADSCU")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stdout, proc.stdout
    assert "Calling AE Title Not Recognized" in proc.stdout, proc.stdout


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1", True),
    ("localhost", True),
    ("10.9.9.9", False),
])
@needs_dcmtk
def test_allow_list_by_ae_title_and_host(node_factory, host: str, allowed: bool) -> None:
    node = node_factory(node={"allowed_callers": [{"ae_title": "GOODSCU", "host": host}]})
    proc = echoscu(node, "GOODSCU")
    if allowed:
        assert proc.returncode == 0, proc.stdout
        node.wait_for_log("C-ECHO from GOODSCU")
        assert node.events("association_rejected") == []
    else:
        assert proc.returncode != 0
        node.wait_for_log("association rejected")
        [event] = wait_until(lambda: node.events("association_rejected"), 5, "a rejection")
        assert event["detail"]["calling_ae"] == "GOODSCU"


@needs_dcmtk
def test_allow_list_from_environment(node_factory) -> None:
    node = node_factory(env={
        "AIWORKER_NODE__ALLOWED_CALLERS": "[{ae_title: MRI1, host: 127.0.0.1}]"})
    assert echoscu(node, "MRI1").returncode == 0
    assert echoscu(node, "MRI2").returncode != 0
    [event] = wait_until(lambda: node.events("association_rejected"), 5, "a rejection")
    assert event["detail"]["calling_ae"] == "MRI2"


@needs_dcmtk
def test_empty_allow_list_allows_everyone(node) -> None:
    for calling in ("ANYONE", "SOMEONE_ELSE"):
        assert echoscu(node, calling).returncode == 0
    assert node.events("association_rejected") == []


def test_allow_list_unit() -> None:
    allow = AllowList.from_config([
        AllowedCaller(ae_title="MRI1"),
        AllowedCaller(ae_title="CT1", host="127.0.0.1"),
    ])
    assert allow.allows("MRI1", "10.1.2.3")
    assert allow.allows("MRI1  ", "10.1.2.3")
    assert allow.allows("CT1", "127.0.0.1")
    assert not allow.allows("CT1", "127.0.0.2")
    assert not allow.allows("mri1", "10.1.2.3")  # AE titles are case-sensitive
    assert not allow.allows("OTHER", "127.0.0.1")
    assert AllowList.from_config([]).allows("ANY", "1.2.3.4")


def test_cli_calls_with_the_configured_ae_title(node_factory, tmp_path) -> None:
    """``aiworker echo/send`` call as node.ae_title from --config unless --calling-ae says."""
    node = node_factory(node={"allowed_callers": [{"ae_title": "MYNODE"}]})
    client = tmp_path / "client.yaml"
    client.write_text("node: {ae_title: MYNODE}\n", encoding="utf-8")
    called = ("echo", "127.0.0.1", str(node.port), "--called-ae", "AIWORKER")
    assert node.cli(*called, "--config", str(client)).returncode == 0
    refused = node.cli(*called)  # no config here: the embedded default AE title, AIWORKER
    assert refused.returncode == 1
    assert "rejected the association" in refused.stderr
    assert node.cli(*called, "--calling-ae", "MYNODE").returncode == 0
