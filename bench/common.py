"""What the bench scripts share: the processes they start, free ports, waiting for a port
or a log line, finding dcmtk, Orthanc and aiworker, the cached phantom study, kept logs, and
the header lines (machine, tools, git revision) and number formatting of their reports.

A script imports what it needs (``from common import PROCS, find_tools, ...``); the bench
folder is on ``sys.path`` when a script in it runs. The receivers the receive benchmarks
start fresh (node, storescp, Orthanc) and the storescu send are in ``targets.py``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
SIZE = 512
SERIES = ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs")  # phantom protocol roles
START_TIMEOUT_S = 60.0
MB = 1e6


# ----------------------------------------------------------------------------- processes


class Processes:
    """Every process this script started; :meth:`stop_all` ends whichever are still running."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str], log: Path | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` in its own session, output to ``log`` (or discarded)."""
        out = open(log, "wb") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            if log:
                out.close()
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = 10.0) -> None:
        """SIGTERM the process group we started, then SIGKILL it after ``grace_s``."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        if proc in self.started:
            self.started.remove(proc)

    def stop_since(self, mark: int) -> None:
        """Stop the processes started after ``len(self.started)`` was ``mark``."""
        for proc in list(self.started[mark:]):
            self.stop(proc)

    def stop_all(self) -> None:
        self.stop_since(0)


PROCS = Processes()


def clean_env(nodelay: bool) -> dict[str, str]:
    """Our environment without AIWORKER_* overrides, with TCP_NODELAY=1 or without it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIWORKER_") and k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Return once 127.0.0.1:port accepts a TCP connection; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before listening on "
                               f"{port}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout_s:.0f} s:\n{tail(log)}")


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Return once ``text`` appears in ``log``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}:\n{tail(log)}")
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not in its log after {timeout_s:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text) or "    (empty log)"


# ----------------------------------------------------------------------------- tools


@dataclass
class Tools:
    """Paths of the external programs the benchmark runs."""

    storescu: str
    storescp: str
    orthanc: str | None
    aiworker: list[str]


@functools.cache
def find_dcmtk(name: str) -> str | None:
    """dcmtk's ``name`` on PATH, skipping same-named tools (pynetdicom's apps in the venv)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for folder in dirs:
        exe = Path(folder) / name
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            continue
        try:
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in out.lower():
            return str(exe)
    return None


def find_orthanc() -> str | None:
    """The Orthanc server binary, if installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    for path in ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc"):
        if os.access(path, os.X_OK):
            return path
    return None


def find_aiworker() -> list[str]:
    """The ``aiworker`` console script next to this Python, else ``python -m aiworker.cli``."""
    script = Path(sys.executable).parent / "aiworker"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "aiworker.cli"]


def find_tools(want_orthanc: bool) -> Tools:
    """Locate dcmtk, Orthanc and aiworker; exit with a clear message if dcmtk is missing."""
    storescu, storescp = find_dcmtk("storescu"), find_dcmtk("storescp")
    if not (storescu and storescp):
        sys.exit("error: dcmtk's storescu and storescp are needed (Debian/Ubuntu: "
                 "apt-get install dcmtk; or make system-deps). Note: the venv's "
                 "pynetdicom 'storescu' is not dcmtk's and is not used.")
    orthanc = find_orthanc() if want_orthanc else None
    if want_orthanc and not orthanc:
        print("note: Orthanc not found (apt-get install orthanc): skipping the Orthanc "
              "target; use --skip-orthanc to silence this.", flush=True)
    return Tools(storescu, storescp, orthanc, find_aiworker())


def version_line(argv: list[str]) -> str:
    """First non-empty line of ``argv``'s output, for the header."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "?"


# ----------------------------------------------------------------------------- study


@dataclass
class Study:
    """The cached study on disk: its folder, its files in order, their total size."""

    folder: Path
    files: list[Path]
    bytes: int

    def series_files(self, number: int) -> list[Path]:
        return sorted((self.folder / f"{number:03d}").glob("*.dcm"))


WARMUP_SLICES = 4  # per series: 12 instances sent untimed to every target before each run


def load_study(slices: int, seed: int = 0) -> Study:
    """The 3-series 512x512 study with ``slices`` per series, generated once under bench/out."""
    folder = OUT / (f"knee-3x{slices}-{SIZE}" + (f"-seed{seed}" if seed else ""))
    marker = folder.with_suffix(".json")  # beside the folder: storescu +sd sends every file
    if not (marker.exists() and folder.is_dir()):
        generate_study(folder, marker, slices, seed)
    meta = json.loads(marker.read_text())
    files = [folder / name for name in meta["files"]]
    return Study(folder, files, sum(f.stat().st_size for f in files))


def generate_study(folder: Path, marker: Path, slices: int, seed: int) -> None:
    """Write the study into a scratch folder, move it into place, then write its marker."""
    sys.path.insert(0, str(ROOT))
    from aiworker.phantom.protocol import Overrides
    from aiworker.phantom.study import StudyOptions, write_study

    print(f"generating the study ({3 * slices} instances) in {folder} ...", flush=True)
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    options = StudyOptions(seed=seed, vendor="siemens", descriptions="vendor", rescan=False,
                           derived=False, images_in_acquisition=True, truth=False,
                           overrides=Overrides(SERIES, SIZE, slices))
    study = write_study(scratch, options)
    names = [str(p.relative_to(study.dicom_dir)) for p in study.files]
    shutil.rmtree(folder, ignore_errors=True)
    study.dicom_dir.rename(folder)
    shutil.rmtree(scratch)
    marker.write_text(json.dumps({"slices": slices, "files": names}))


def keep_logs(run_dir: Path, label: str) -> Path:
    """Copy a run's logs and configs to bench/out/failed/<time>-<label>/; return that folder."""
    slug = "".join(c if c.isalnum() else "-" for c in label.lower())
    dest = OUT / "failed" / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    dest.mkdir(parents=True, exist_ok=True)
    for path in run_dir.iterdir():
        if path.is_file() and path.suffix in (".log", ".yaml", ".json"):
            shutil.copy2(path, dest / path.name)
    return dest


# ----------------------------------------------------------------------------- report


def machine_lines(tools: Tools, workdir: Path) -> list[str]:
    """Command line, machine, tool versions and code revision, for the header."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    lines = [
        f"command:  {shlex.join([sys.executable, *sys.argv])}",
        f"machine:  nproc {nproc}, {cpu}, {mem:.0f} GiB RAM, {platform.platform()}",
        f"disk:     {workdir} on {filesystem(workdir)}",
        f"python:   {platform.python_version()}; aiworker {git_revision()}",
        f"dcmtk:    {version_line([tools.storescu, '--version']).strip('$ ')}",
    ]
    if tools.orthanc:
        lines.append(f"orthanc:  {version_line([tools.orthanc, '--version'])}")
    return lines


def filesystem(path: Path) -> str:
    """The device and type of the filesystem holding ``path`` (longest mount prefix)."""
    best = ("?", "?", "")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if str(path).startswith(mount) and len(mount) > len(best[2]):
            best = (part.device, part.fstype, mount)
    return f"{best[0]} ({best[1]}, mounted on {best[2]})"


def git_revision() -> str:
    """The repo's commit, flagged when aiworker/ has uncommitted changes."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return out.stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD") or "?"
        dirty = git("status", "--porcelain", "--", "aiworker")
    except OSError:
        return "(git unavailable)"
    return f"commit {rev}" + (" + uncommitted changes in aiworker/" if dirty else "")


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or a dash of the same width."""
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def rows(db: Path, query: str, params: tuple = ()) -> list[dict]:
    """One read of a node's state DB, opened read-only so a running node is not held up."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(query, params)]
    finally:
        conn.close()
