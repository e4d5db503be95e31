"""Small test tools: paths, skip markers, polling, config merging, dcmtk and dciodvfy."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
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


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's lines about ``path`` that report an error (skips the test when dicom3tools
    is not installed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False,
                         timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
