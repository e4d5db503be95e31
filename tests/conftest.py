"""Fixtures: synthetic studies, the node as a real subprocess, TLS certificates, Orthanc.

Every test that talks to the node gets its own process, port and data dir under its
``tmp_path``; the node's stderr (its log) is kept in ``tmp_path/<name>.log`` so tests can
assert on log lines.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.node import NodeProcess, Study, node_config
from helpers.orthanc import OrthancProcess
from helpers.pg_cluster import PgCluster, PgClusterError
from helpers.tools import DCMTK_MISSING, HAVE_DCMTK, ORTHANC, ORTHANC_MISSING

from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study

# The series of a test study, in this order: make_study(series=N) takes the first N.
ROLES = ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs", "sag_t1", "cor_t1", "cor_stir", "ax_pd_fs",
         "sag_pd")
_seeds = itertools.count(101)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, tests marked ``dcmtk`` or ``orthanc`` when the tool is missing."""
    for item in items:
        if "dcmtk" in item.keywords and not HAVE_DCMTK:
            item.add_marker(pytest.mark.skip(reason=DCMTK_MISSING))
        if "orthanc" in item.keywords and ORTHANC is None:
            item.add_marker(pytest.mark.skip(reason=ORTHANC_MISSING))


# --- studies -----------------------------------------------------------------------------


@pytest.fixture
def make_study(tmp_path: Path) -> Callable[..., Study]:
    """``make_study(name, series=3, slices=5, size=64, seed=None, ...)`` writes a phantom study.

    A synthetic knee study (Siemens conventions, uncompressed, explicit VR little endian) of
    the first ``series`` of :data:`ROLES`, numbered 1, 2, 3, ..., each ``slices`` slices of
    ``size`` x ``size`` pixels, in ``tmp_path/name/dicom`` (one folder per series, nothing
    else: the ground truth is not written). ImagesInAcquisition is written unless
    ``images_in_acquisition`` is false. Each call gets a fresh seed unless one is given, so
    two studies in one test never share UIDs.
    """

    def make(name: str = "study", series: int = 3, slices: int = 5, size: int = 64,
             seed: int | None = None, patient_name: str = "PHANTOM^KNEE",
             images_in_acquisition: bool = True) -> Study:
        seed = next(_seeds) if seed is None else seed
        options = StudyOptions(
            seed=seed, vendor="siemens", descriptions="vendor", rescan=False, derived=False,
            patient_name=patient_name, images_in_acquisition=images_in_acquisition,
            overrides=Overrides(ROLES[:series], size, slices), truth=False,
            volume_spacing=2.0)  # coarse anatomy: these tests look at transport, not pixels
        written = write_study(tmp_path / name, options)
        return Study(root=written.dicom_dir, files=written.files, seed=seed,
                     patient_name=patient_name)

    return make


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster for the whole session (tests/helpers/pg_cluster.py),
    stopped at the end; the tests using it skip, with the reason, when none can be started here."""
    try:
        cluster = PgCluster().start()
    except PgClusterError as exc:
        pytest.skip(f"no PostgreSQL test cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a fresh, empty database on the session's cluster, one per test."""
    return pg_cluster.new_database()


# --- the node ----------------------------------------------------------------------------


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """``node_factory(name="node", env=None, start=True, **config_overrides)``.

    Overrides are merged into the config section by section, e.g.
    ``node_factory(node={"allowed_callers": [{"ae_title": "GOODSCU"}]})``. The config starts
    from config/aiworker.yaml with node.host 127.0.0.1, a free node.port, storage.data_dir
    under tmp_path, storage.min_free_mb 1 and completion.series_stable_seconds 1.0.
    """
    nodes: list[NodeProcess] = []

    def make(name: str = "node", env: dict[str, str] | None = None, start: bool = True,
             **overrides: Any) -> NodeProcess:
        node = NodeProcess(tmp_path, name, node_config(tmp_path, name, overrides), env)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in nodes:
        node.close()


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """A running node with the test defaults."""
    return node_factory()


# --- TLS material ------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path


_EXTENSIONS = """\
[server]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def _openssl(*args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"openssl {' '.join(map(str, args))}: {proc.stderr}"


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN=aiworker test {name}", cwd=folder)
    return key, cert


def _make_leaf(folder: Path, name: str, cn: str, ca: tuple[Path, Path], ext: str
               ) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={cn}", cwd=folder)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", folder / "ext.cnf", "-extensions", ext,
             cwd=folder)
    return key, cert


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, made with openssl;
    plus a second, untrusted CA with its own client cert."""
    folder = tmp_path_factory.mktemp("pki")
    (folder / "ext.cnf").write_text(_EXTENSIONS)
    ca = _make_ca(folder, "ca")
    server = _make_leaf(folder, "server", "127.0.0.1", ca, "server")
    client = _make_leaf(folder, "client", "GOODSCU", ca, "client")
    other_ca = _make_ca(folder, "other-ca")
    other_client = _make_leaf(folder, "other-client", "MALLORY", other_ca, "client")
    return PKI(ca_cert=ca[1], server_cert=server[1], server_key=server[0],
               client_cert=client[1], client_key=client[0], other_ca_cert=other_ca[1],
               other_client_cert=other_client[1], other_client_key=other_client[0])


# --- Orthanc -----------------------------------------------------------------------------


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancProcess]]:
    """``orthanc_factory(modalities)`` starts Orthanc; it is killed at teardown."""
    if ORTHANC is None:
        pytest.skip(ORTHANC_MISSING)
    started: list[OrthancProcess] = []

    def make(modalities: dict[str, list[Any]]) -> OrthancProcess:
        server = OrthancProcess(tmp_path, modalities)
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()  # throwaway storage: no clean shutdown needed (SIGTERM takes ~3.5 s)
