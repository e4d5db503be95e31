"""DICOM TLS on the receiving port, with client certificates (mutual TLS)."""

from __future__ import annotations

import socket
import time

import pytest
from helpers.dicom import dataset_bytes
from helpers.tools import dcmtk, needs_dcmtk, needs_openssl, wait_until

pytestmark = [needs_dcmtk, needs_openssl]


@pytest.fixture
def tls_node(node_factory, pki):
    return node_factory(node={"tls": {
        "enabled": True,
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "ca": str(pki.ca_cert),
        "require_client_cert": True,
    }})


def tls_args(pki, client: bool = True) -> list[str]:
    """dcmtk options: +tls KEY CERT with a client certificate, +tla without; trust our CA."""
    if client:
        return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)]
    return ["+tla", "+cf", str(pki.ca_cert)]


def echoscu(node, *options: str, timeout_s: int = 10):
    return dcmtk("echoscu", "-v", *options, "-to", str(timeout_s), "-ta", str(timeout_s),
                 "-aec", node.ae_title, "127.0.0.1", str(node.port), timeout=60)


def test_tls_echo_with_client_certificate(tls_node, pki) -> None:
    proc = echoscu(tls_node, *tls_args(pki))
    assert proc.returncode == 0, proc.stdout
    assert "Received Echo Response (Success)" in proc.stdout
    tls_node.wait_for_log("C-ECHO from ECHOSCU")
    assert "listening: DICOM TLS AE AIWORKER" in tls_node.log_text()


def test_tls_store_series(tls_node, pki, make_study) -> None:
    study = make_study(series=1, slices=4)
    proc = dcmtk("storescu", *tls_args(pki), "+sd", "+r", "-aec", tls_node.ae_title,
                 "127.0.0.1", str(tls_node.port), study.root, timeout=60)
    assert proc.returncode == 0, proc.stdout
    rows = tls_node.sql("SELECT sop_uid, path, state FROM instances")
    assert {r["sop_uid"] for r in rows} == set(study.sop_uid.values())
    assert {r["state"] for r in rows} == {"stored"}
    for source in study.files:
        assert dataset_bytes(study.spool_path(tls_node.data_dir, source)) == dataset_bytes(source)
    status = wait_until(
        lambda: (s := tls_node.study_status(study.study_uid))["state"] == "complete" and s,
        15, "the study to complete")
    assert status["instances"] == 4


def test_plain_tcp_caller_is_refused(tls_node, pki) -> None:
    proc = echoscu(tls_node)
    assert proc.returncode != 0
    assert "Association Request Failed" in proc.stdout, proc.stdout
    assert "C-ECHO from" not in tls_node.log_text()
    # and the node is still fine for TLS callers
    assert echoscu(tls_node, *tls_args(pki)).returncode == 0


def test_tls_without_client_certificate_is_refused(tls_node, pki) -> None:
    proc = echoscu(tls_node, *tls_args(pki, client=False))
    assert proc.returncode != 0, proc.stdout
    assert "C-ECHO from" not in tls_node.log_text()


def test_client_certificate_from_another_ca_is_refused(tls_node, pki) -> None:
    proc = echoscu(tls_node, "+tls", str(pki.other_client_key), str(pki.other_client_cert),
                   "+cf", str(pki.ca_cert))
    assert proc.returncode != 0, proc.stdout
    assert "C-ECHO from" not in tls_node.log_text()


def test_silent_connection_does_not_block_other_tls_callers(tls_node, pki) -> None:
    """A caller that opens TCP and never starts the handshake (a port scanner, a stuck
    client) must not stop everyone else from associating."""
    silent = socket.create_connection(("127.0.0.1", tls_node.port))
    try:
        time.sleep(0.2)
        proc = dcmtk("echoscu", *tls_args(pki), "-to", "5", "-ta", "5", "-ts", "5",
                     "-aec", tls_node.ae_title, "127.0.0.1", str(tls_node.port), timeout=30)
        assert proc.returncode == 0, f"TLS echo blocked by an idle connection: {proc.stdout}"
    finally:
        silent.close()
