"""The receivers the receive benchmarks start fresh in an empty folder (``aiworker serve``,
dcmtk ``storescp``, Orthanc), how many instances each holds, and the timed dcmtk storescu
send of a :class:`Mode`'s batches to one of them."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import (
    PROCS,
    ROOT,
    START_TIMEOUT_S,
    Tools,
    clean_env,
    free_port,
    tail,
    wait_for_port,
    wait_for_text,
)

# ----------------------------------------------------------------------------- targets


@dataclass
class Server:
    """One running target: its process, port, called AE title and a received-instance count."""

    proc: subprocess.Popen
    port: int
    aet: str
    count: Callable[[], int]


def start_node(tools: Tools, fsync: bool, processes: int = 1,
               extra_config: str = "") -> Callable[[Path, bool], Server]:
    """A starter for ``aiworker serve`` with a config written into the run folder
    (``extra_config``: more YAML sections, e.g. pipelines and inference)."""

    def start(run_dir: Path, nodelay: bool) -> Server:
        port, data = free_port(), run_dir / "data"
        config = run_dir / "aiworker.yaml"
        config.write_text(
            f"node: {{host: 127.0.0.1, port: {port}, receive_processes: {processes}}}\n"
            f"storage: {{data_dir: {json.dumps(str(data))}, min_free_mb: 1, "
            f"fsync: {str(fsync).lower()}}}\n"
            "completion: {series_stable_seconds: 5}\n"
            "logging: {level: WARNING}\nweb: {enabled: false}\n" + extra_config
        )
        log = run_dir / "node.log"
        proc = PROCS.start([*tools.aiworker, "serve", "--config", str(config)],
                           clean_env(nodelay), log, cwd=ROOT)
        wait_for_port(port, proc, log, START_TIMEOUT_S)
        # the port opens with the first receiving process; the banner comes once all listen
        wait_for_text(log, "aiworker listening as AE", proc, START_TIMEOUT_S)
        return Server(proc, port, "AIWORKER", lambda: count_files(data / "spool", "*.dcm"))

    return start


def start_storescp(tools: Tools) -> Callable[[Path, bool], Server]:
    """A starter for dcmtk's ``storescp -od DIR PORT`` (single process)."""

    def start(run_dir: Path, nodelay: bool) -> Server:
        port, data = free_port(), run_dir / "received"
        data.mkdir()
        log = run_dir / "storescp.log"
        proc = PROCS.start([tools.storescp, "-od", str(data), str(port)],
                           clean_env(nodelay), log)
        wait_for_port(port, proc, log, START_TIMEOUT_S)
        return Server(proc, port, "STORESCP", lambda: count_files(data, "*"))

    return start


def orthanc_config(run_dir: Path, dicom_port: int, http_port: int) -> dict:
    """A minimal Orthanc configuration storing into ``run_dir``."""
    return {
        "Name": "aiworker-bench",
        "StorageDirectory": str(run_dir / "storage"),
        "IndexDirectory": str(run_dir / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "SaveJobs": False,
    }


def launch_orthanc(tools: Tools, run_dir: Path,
                   nodelay: bool) -> tuple[subprocess.Popen, int, int]:
    """Orthanc on free DICOM and HTTP ports with a config in ``run_dir``, once both listen:
    its process, DICOM port and HTTP port."""
    dicom_port, http_port = free_port(), free_port()
    config = run_dir / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(run_dir, dicom_port, http_port), indent=2))
    log = run_dir / "orthanc.log"
    proc = PROCS.start([str(tools.orthanc), str(config)], clean_env(nodelay), log)
    wait_for_port(dicom_port, proc, log, START_TIMEOUT_S)
    wait_for_port(http_port, proc, log, START_TIMEOUT_S)
    return proc, dicom_port, http_port


def start_orthanc(tools: Tools) -> Callable[[Path, bool], Server]:
    """A starter for Orthanc with a generated JSON config."""

    def start(run_dir: Path, nodelay: bool) -> Server:
        proc, dicom_port, http_port = launch_orthanc(tools, run_dir, nodelay)
        return Server(proc, dicom_port, "ORTHANC", lambda: orthanc_instances(http_port))

    return start


def count_files(folder: Path, pattern: str) -> int:
    """How many files matching ``pattern`` lie under ``folder``."""
    return sum(1 for p in folder.rglob(pattern) if p.is_file()) if folder.exists() else 0


def orthanc_instances(http_port: int) -> int:
    """CountInstances from Orthanc's REST /statistics."""
    url = f"http://127.0.0.1:{http_port}/statistics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return int(json.load(reply)["CountInstances"])


@dataclass
class Mode:
    """How the study is sent: which files, in how many storescu processes, Nagle or not."""

    name: str
    nodelay: bool
    batches: list[list[Path]]
    dirs: bool  # True: each batch is one folder sent with +sd +r
    runs: int
    note: str


def storescu_argv(tools: Tools, server: Server, batch: list[Path], dirs: bool) -> list[str]:
    """The storescu command for one batch: a folder with +sd +r, or a list of files."""
    head = [tools.storescu]
    tail = ["-aec", server.aet, "127.0.0.1", str(server.port)]
    if dirs:
        return head + ["+sd", "+r"] + tail + [str(p) for p in batch]
    return head + tail + [str(p) for p in batch]


def send(tools: Tools, server: Server, mode: Mode, run_dir: Path, timeout_s: float) -> float:
    """Run the mode's storescu processes at once; return the wall time until the last ends."""
    env = clean_env(mode.nodelay)
    logs = [run_dir / f"storescu-{i}.log" for i in range(len(mode.batches))]
    t0 = time.perf_counter()
    procs = [PROCS.start(storescu_argv(tools, server, batch, mode.dirs), env, log)
             for batch, log in zip(mode.batches, logs, strict=True)]
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, timeout_s - (time.perf_counter() - t0)))
        elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {timeout_s:g} s") from exc
    finally:
        for proc in procs:
            PROCS.stop(proc, grace_s=2.0)
    failed = [(p, log) for p, log in zip(procs, logs, strict=True) if p.returncode != 0]
    if failed:
        proc, log = failed[0]
        raise RuntimeError(f"{len(failed)} of {len(procs)} storescu failed, the first with "
                           f"{storescu_exit(proc.returncode)}\n{tail(log)}")
    return elapsed


def storescu_exit(code: int) -> str:
    """What a non-zero storescu exit code means (dcmtk 3.6.x halts on the first failed store)."""
    if code < 0:
        return f"signal {-code}"
    if code >= 0xA0:
        return (f"exit code {code}: the receiver answered a C-STORE with failure status "
                f"0x{code:02X}xx (storescu exits with the status's high byte)")
    if code == 10:
        return "exit code 10: a C-STORE failed without a status (network error)"
    return f"exit code {code}"


def settle_count(server: Server, expected: int, wait_s: float = 3.0) -> int:
    """The target's received-instance count, re-read briefly until it reaches ``expected``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            count = server.count()
        except OSError:
            count = -1
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.1)
