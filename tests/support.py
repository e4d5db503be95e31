"""Helpers shared by the test modules: real node processes, dcmtk, raw DICOM bytes.

The fixtures in ``conftest.py`` hand these out; test modules import the plain functions
directly (``from support import ...``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from aiworker.dispatch.mllp import MllpReceiver
from aiworker.store.layout import DataPaths

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "config" / "aiworker.yaml"
BIN = Path(sys.executable).parent
AIWORKER = str(BIN / "aiworker")

STARTUP_TIMEOUT_S = 15.0

# --- skip markers ------------------------------------------------------------------------

HAVE_DCMTK = shutil.which("storescu") is not None and shutil.which("echoscu") is not None
ORTHANC = "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else shutil.which("Orthanc")
HAVE_OPENSSL = shutil.which("openssl") is not None

# Tests that need dcmtk or Orthanc carry these markers; conftest.py skips them, with the
# reason, where the tool is missing (and ``-m "not orthanc"`` deselects them).
needs_dcmtk = pytest.mark.dcmtk
needs_orthanc = pytest.mark.orthanc
DCMTK_MISSING = "dcmtk not installed (storescu/echoscu missing): apt-get install dcmtk"
ORTHANC_MISSING = "Orthanc not installed (/usr/sbin/Orthanc): apt-get install orthanc"
needs_openssl = pytest.mark.skipif(
    not HAVE_OPENSSL, reason="openssl CLI not installed: apt-get install openssl"
)


# --- small utilities ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` written over it, recursively for nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- dcmtk -------------------------------------------------------------------------------


def dcmtk_env(nodelay: bool = True) -> dict[str, str]:
    """The environment for a dcmtk tool; TCP_NODELAY=1 makes dcmtk turn Nagle off."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def dcmtk(*args: str | Path, nodelay: bool = True, timeout: float = 60,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool (``dcmtk("echoscu", ...)``); stdout and stderr both in ``.stdout``."""
    return subprocess.run(
        [str(a) for a in args], env=dcmtk_env(nodelay), cwd=cwd, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
    )


# --- DICOM bytes -------------------------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """Split a DICOM Part 10 file into (preamble + file meta group, data set bytes).

    Walks the group 0002 elements (always explicit VR little endian) one by one, so the
    split is exact whether or not a group length is present.
    """
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    while pos + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return data[:pos], data[pos:]


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, exactly as on disk, without the file meta."""
    return split_part10(Path(path).read_bytes())[1]


def transfer_syntax(path: Path) -> str:
    return str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)


# --- synthetic studies -------------------------------------------------------------------


@dataclass
class Study:
    """A study written by the phantom generator, with the UIDs of every file."""

    root: Path
    files: list[Path]
    seed: int
    patient_name: str
    study_uid: str = ""
    series: dict[str, list[Path]] = field(default_factory=dict)  # series UID -> files
    sop_uid: dict[Path, str] = field(default_factory=dict)
    series_of: dict[Path, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for path in self.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.study_uid = str(ds.StudyInstanceUID)
            self.sop_uid[path] = str(ds.SOPInstanceUID)
            self.series_of[path] = str(ds.SeriesInstanceUID)
            self.series.setdefault(str(ds.SeriesInstanceUID), []).append(path)

    @property
    def patient_id(self) -> str:
        return f"PH{self.seed:06d}"

    def spool_path(self, data_dir: Path, path: Path) -> Path:
        """Where the node must keep the instance read from ``path``."""
        return (data_dir / "spool" / self.study_uid / self.series_of[path]
                / f"{self.sop_uid[path]}.dcm")


# --- the node under test -----------------------------------------------------------------


class NodeProcess:
    """``aiworker serve`` as a subprocess with its own config file and data dir."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any],
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.args = args  # after ``serve --config CFG``: ``--role receive``
        self.name = name
        self.config = config
        self.extra_env = env or {}
        self.port: int = config["node"]["port"]
        self.ae_title: str = config["node"]["ae_title"]
        self.data_dir = Path(config["storage"]["data_dir"])
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.stdout_path = workdir / f"{name}.stdout"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self._dbs: list[Any] = []

    # lifecycle

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> NodeProcess:
        assert self.proc is None or self.proc.poll() is not None, "node already running"
        with open(self.log_path, "ab") as log, open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                [AIWORKER, "serve", "--config", str(self.config_path), *self.args],
                stdout=out, stderr=log, cwd=self.workdir, env=self.env(),
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"aiworker serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill9()
                raise RuntimeError(f"aiworker serve did not listen on {self.port} within "
                                   f"{STARTUP_TIMEOUT_S:.0f}s:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> NodeProcess:
        self.stop()
        return self.start()

    def reconfigure(self, **overrides: Any) -> None:
        """Merge ``overrides`` into the config file; takes effect at the next start."""
        self.config = deep_merge(self.config, overrides)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False),
                                    encoding="utf-8")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        for db in self._dbs:
            with contextlib.suppress(Exception):
                db.close()
        self._dbs.clear()
        self.stop()

    # observing

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stdout_text(self) -> str:
        if not self.stdout_path.exists():
            return ""
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        return wait_until(lambda: text in self.log_text() and self.log_text(), timeout,
                          f"{text!r} in the node log")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``aiworker ARGS`` in the node's environment (no --config added)."""
        return subprocess.run([AIWORKER, *args], capture_output=True, text=True,
                              cwd=self.workdir, env=self.env(), timeout=timeout)

    def status_json(self) -> dict[str, Any]:
        proc = self.cli("status", "--json", "--config", str(self.config_path))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def study_status(self, study_uid: str) -> dict[str, Any] | None:
        return next((s for s in self.status_json()["studies"] if s["study_uid"] == study_uid),
                    None)

    def wait_study_complete(self, study_uid: str, timeout: float, what: str) -> dict[str, Any]:
        """The study's ``status --json`` entry once its state is ``complete``."""
        def complete() -> dict[str, Any] | None:
            status = self.study_status(study_uid)
            return status if status and status["state"] == "complete" else None

        return wait_until(complete, timeout, what)

    @property
    def db_path(self) -> Path:
        return DataPaths(self.data_dir).db

    @property
    def spool(self) -> Path:
        return DataPaths(self.data_dir).spool

    def db(self) -> Any:
        """An :class:`aiworker.store.db.StateDB` on the node's state DB (closed at teardown)."""
        from aiworker.store.db import StateDB

        db = StateDB(self.db_path)
        self._dbs.append(db)
        return db

    def sql(self, query: str, params: tuple = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query on the node's state DB ([] before the DB exists)."""
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(query, params).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def instance_count(self) -> int:
        rows = self.sql("SELECT COUNT(*) AS n FROM instances WHERE state = 'stored'")
        return rows[0]["n"] if rows else 0

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM events" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        rows = self.sql(query, (kind,) if kind else ())
        for row in rows:
            row["detail"] = json.loads(row["detail"] or "{}")
        return rows

    def spool_files(self) -> list[Path]:
        return sorted(self.spool.rglob("*.dcm")) if self.spool.exists() else []

    def spool_temporaries(self) -> list[Path]:
        return sorted(self.spool.rglob("*.tmp")) if self.spool.exists() else []


def node_config(workdir: Path, name: str, overrides: dict[str, Any] | None = None,
                port: int | None = None) -> dict[str, Any]:
    """The shipped defaults, made fit for a test, with ``overrides`` on top."""
    base = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    test_values = {
        "node": {"host": "127.0.0.1", "port": port or free_port()},
        "storage": {"data_dir": str(workdir / f"{name}-var"), "min_free_mb": 1},
        "completion": {"series_stable_seconds": 1.0},
        "web": {"port": free_port()},  # nodes side by side: never the default 8080
    }
    return deep_merge(deep_merge(base, test_values), overrides or {})


@contextlib.contextmanager
def running_node(workdir: Path, name: str = "node", env: dict[str, str] | None = None,
                 start: bool = True, **overrides: Any) -> Iterator[NodeProcess]:
    node = NodeProcess(workdir, name, node_config(workdir, name, overrides), env)
    try:
        if start:
            node.start()
        yield node
    finally:
        node.close()


# --- raw pynetdicom SCU ------------------------------------------------------------------


def raw_store(port: int, files: list[Path], called: str = "AIWORKER",
              calling: str = "RAWSCU") -> list[Any]:
    """C-STORE each file's bytes exactly as on disk (no decoding) on one association.

    Returns the response data set of each C-STORE (``.Status``, ``.ErrorComment``).
    """
    from pynetdicom import AE, _config

    syntaxes: dict[str, set[str]] = {}
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
            str(meta.TransferSyntaxUID))
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, ts in sorted(syntaxes.items()):
        ae.add_requested_context(sop_class, sorted(ts))
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoding
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        assert assoc.is_established, f"association with 127.0.0.1:{port} failed"
        responses = [assoc.send_c_store(path) for path in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return responses


def raw_echo(port: int, called: str = "AIWORKER", calling: str = "RAWSCU") -> int | None:
    """C-ECHO with pynetdicom; the status, or None when no association was made."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status) if "Status" in status else None


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's lines about ``path`` that report an error (skips the test when dicom3tools
    is not installed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False,
                         timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]



# --- a PACS stand-in --------------------------------------------------------------------


class OrthancProcess:
    """Debian's Orthanc on free loopback ports, storing under ``workdir``, knowing the DICOM
    ``modalities`` given; ``config`` is merged over its JSON configuration (e.g. Lua
    scripts, or ``RegisteredUsers`` with ``AuthenticationEnabled``: the first user is the
    one this class's own requests sign in as)."""

    def __init__(self, workdir: Path, modalities: dict[str, Any],
                 config: dict[str, Any] | None = None):
        users = (config or {}).get("RegisteredUsers") or {}
        self.auth = next(iter(users.items()), None)  # (user, password) for our requests
        self.dicom_port = free_port()
        self.http_port = free_port()
        storage = workdir / "orthanc-db"
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        self.config_path.write_text(json.dumps(deep_merge({
            "Name": "aiworker-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": modalities,
            "Plugins": [],
        }, config or {}), indent=2))
        self.start()

    def start(self) -> None:
        """Start Orthanc (again, after :meth:`stop`: same ports, same storage) and wait
        until its REST API answers."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(ORTHANC), str(self.config_path)],
                                         cwd=self.config_path.parent, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + max(STARTUP_TIMEOUT_S, 30)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()}")
            try:
                if self.get("/system")["DicomAet"] == "ORTHANC":
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {self.log_path.read_text()}")
            time.sleep(0.1)

    def file(self, instance_id: str) -> bytes:
        """The DICOM file of one of Orthanc's instances."""
        req = self._signed(urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file"))
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def _signed(self, req: urllib.request.Request) -> urllib.request.Request:
        """``req`` with basic auth as the first registered user, when there is one."""
        if self.auth is not None:
            import base64

            pair = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {pair}")
        return req

    def request(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        data = None if body is None else (body if isinstance(body, bytes)
                                          else json.dumps(body).encode())
        req = self._signed(urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                                  data=data, method=method))
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path, timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        """Stop Orthanc at once (SIGKILL), for teardown: its SIGTERM takes ~3.5 s here, and
        a test's throwaway storage needs no clean shutdown."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """Orthanc's record of a study (``/studies/{id}``), or None."""
        found = self.request("POST", "/tools/lookup", study_uid.encode(), timeout=5)
        return self.get(f"/studies/{found[0]['ID']}") if found else None

    def series(self, study_uid: str) -> list[dict[str, Any]]:
        """Orthanc's records of a study's series (``/series/{id}``)."""
        study = self.study(study_uid)
        return [] if study is None else [self.get(f"/series/{sid}") for sid in study["Series"]]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


# --- a RIS stand-in ------------------------------------------------------------------------


class MllpListener:
    """A RIS for tests (:class:`~aiworker.dispatch.mllp.MllpReceiver` on a free loopback
    port): keeps each message's text in ``messages`` and answers it with MSA-1 the next of
    ``codes`` (the last one repeats) and MSA-3 ``reason``, after waiting the next of
    ``delays_s`` seconds (none when they run out)."""

    def __init__(self, codes: tuple[str, ...] = ("AA",), reason: str = "",
                 delays_s: tuple[float, ...] = ()):
        self.codes, self.reason, self.delays_s = list(codes), reason, list(delays_s)
        self.messages: list[str] = []
        self.receiver = MllpReceiver(self._answer)
        self.port = self.receiver.port

    def _answer(self, message: str) -> tuple[str, str]:
        n = len(self.messages)
        self.messages.append(message)
        time.sleep(self.delays_s[n] if n < len(self.delays_s) else 0)
        return self.codes[min(n, len(self.codes) - 1)], self.reason

    def stop(self) -> None:
        self.receiver.close()
