"""A PACS stand-in: Debian's Orthanc on free loopback ports."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from helpers.tools import ORTHANC, STARTUP_TIMEOUT_S, deep_merge, free_port

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
