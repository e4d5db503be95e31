"""``aiworker demo``: the whole node at work on one phantom study, in a minute.

:func:`run_demo` writes a phantom knee study (torn ACL, fixed seed), starts a throwaway
receiving SCP (standing in for the PACS) and an MLLP listener (standing in for the RIS) on
free loopback ports, starts ``aiworker serve`` as a subprocess configured to send its
results to them, C-STOREs the study to it, waits until the SEG and SR reached the SCP and
the ORU^R01 the listener, then prints the report, the ACL finding, the timings per stage
and the paths of what arrived, with the preview PNG the node wrote in the job's result
folder. :func:`push_study` only writes the study and sends it to a node that is already
running.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

AE_TITLE = "AIWORKER"
PACS_AE = "DEMOPACS"
SEED = 20240
STUDY_ROLES = ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs")
MATRIX = 128
START_TIMEOUT_S = 60.0
POLL_S = 0.25


class DemoError(Exception):
    """The demo could not finish; the message says why."""


@dataclass
class Arrivals:
    """What the stand-in PACS and RIS received."""

    dicom: list[Path] = field(default_factory=list)
    hl7: list[Path] = field(default_factory=list)

    def dicom_of(self, modality: str) -> Path | None:
        """The first received object of ``modality`` (SEG, SR)."""
        import pydicom

        for path in list(self.dicom):
            if pydicom.dcmread(path, stop_before_pixels=True).Modality == modality:
                return path
        return None


def write_phantom(folder: Path) -> Any:
    """One phantom knee study with a torn ACL, the same on every run."""
    from aiworker.phantom.protocol import Overrides
    from aiworker.phantom.study import StudyOptions, write_study

    return write_study(folder, StudyOptions(
        seed=SEED, acl="torn", rescan=False, derived=False,
        overrides=Overrides(roles=STUDY_ROLES, matrix=MATRIX)))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_pacs(folder: Path, arrivals: Arrivals) -> tuple[Any, int]:
    """A pynetdicom storage SCP on a free loopback port, saving each object to ``folder``.
    Returns the server (``shutdown()`` stops it) and its port."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = folder / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        arrivals.dicom.append(path)
        return 0x0000

    ae = AE(ae_title=PACS_AE)
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, port


def start_ris(folder: Path, arrivals: Arrivals) -> Any:
    """An MLLP receiver on a free loopback port that saves each message to ``folder`` and
    answers AA; its ``port``, and ``close()`` stops it."""
    from aiworker.dispatch.mllp import MllpReceiver

    folder.mkdir(parents=True, exist_ok=True)

    def save(message: str) -> tuple[str, str]:
        path = folder / f"message-{len(arrivals.hl7) + 1}.hl7"
        path.write_bytes(message.encode("utf-8"))
        arrivals.hl7.append(path)
        return "AA", ""

    return MllpReceiver(save)


def node_config(workdir: Path, port: int, pacs_port: int, ris_port: int) -> Path:
    """A node config in ``workdir`` that listens on ``port`` and sends the knee pipeline's
    results to the stand-in PACS and RIS."""
    config = {
        "node": {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(workdir / "var"), "min_free_mb": 1},
        "completion": {"series_stable_seconds": 1},
        "destinations": {
            "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs_port,
                     "ae_title": PACS_AE},
            "ris": {"kind": "hl7", "host": "127.0.0.1", "port": ris_port}},
        "pipelines": [{"name": "knee", "rules": "config/rules/knee.yaml", "model": "knee-demo",
                       "outputs": ["seg", "sr", "report", "hl7"],
                       "send_to": ["pacs", "ris"]}],
        "dispatch": {"interval_s": 0.2, "retry_base_s": 1, "timeout_s": 10},
        "web": {"host": "127.0.0.1", "port": free_port()},  # beside a node on 8080
    }
    path = workdir / "aiworker.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def start_node(workdir: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    """``aiworker serve`` with ``config`` as a subprocess of this Python, logging to
    ``workdir/node.log``; returns once it listens on ``port``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(workdir / "node.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "aiworker.cli", "serve", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT,
                                cwd=workdir, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _listening(port):
        if proc.poll() is not None:
            raise DemoError(f"aiworker serve exited with {proc.returncode}; see "
                            f"{workdir / 'node.log'}")
        if time.monotonic() > deadline:
            stop_node(proc)
            raise DemoError(f"aiworker serve did not listen within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
    return proc


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    """Stop the node as Ctrl-C would, killing it if it does not end in 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def push(study: Any, host: str, port: int, called_aet: str) -> int:
    """C-STORE every file of ``study`` with aiworker's SCU; returns how many were sent."""
    from aiworker.dispatch.scu import SCUError, send

    try:
        summary = send(study.files, host, port, called_aet, "DEMOSCU")
    except SCUError as exc:
        raise DemoError(f"sending the study to {called_aet}@{host}:{port} failed: {exc}") \
            from exc
    if not summary.ok:
        raise DemoError(f"the node did not store every file: statuses {dict(summary.statuses)}")
    return len(study.files)


def wait_for_results(db_path: Path, arrivals: Arrivals, timeout: float,
                     node: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Poll the node's state DB until its job is done and the SEG, SR and ORU arrived;
    returns the job row. A failed job, a node that exits or the timeout raise DemoError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(db_path)
        if job is not None and job["state"] == "failed":
            raise DemoError(f"the job failed ({job['error_kind']}): {job['error']}")
        if (job is not None and job["state"] == "done" and arrivals.hl7
                and arrivals.dicom_of("SEG") and arrivals.dicom_of("SR")):
            return job
        if node.poll() is not None:
            raise DemoError(f"the node exited with {node.returncode}")
        time.sleep(POLL_S)
    job = _job(db_path)
    where = f"the job is {job['state']}" if job else "no job was queued"
    raise DemoError(f"no results within {timeout:.0f} s ({where}; received "
                    f"{len(arrivals.dicom)} DICOM object(s), {len(arrivals.hl7)} HL7 "
                    "message(s))")


def _rows(db_path: Path, query: str) -> list[dict[str, Any]]:
    """Rows of a read-only query on the node's state DB ([] before it exists)."""
    if not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(query)]
    except sqlite3.OperationalError:  # a table not made yet
        return []
    finally:
        db.close()


def _job(db_path: Path) -> dict[str, Any] | None:
    jobs = _rows(db_path, "SELECT * FROM jobs ORDER BY created_at DESC LIMIT 1")
    return jobs[0] if jobs else None


def stage_timings(db_path: Path, job: dict[str, Any]) -> list[tuple[str, float]]:
    """Seconds per stage: receive, select wait, the job's own stages, and send."""
    study = _rows(db_path, "SELECT * FROM studies")[0]
    sent = [r["sent_at"] for r in _rows(db_path, "SELECT sent_at FROM outbox") if r["sent_at"]]
    stages = [("receive", study["last_received"] - study["first_received"]),
              ("select wait (series stable + selection)",
               job["created_at"] - study["last_received"])]
    if job["started_at"]:
        stages.append(("job queued", job["started_at"] - job["created_at"]))
    stages += [(f"job: {name}", float(s)) for name, s in json.loads(job["timings"] or "{}")
               .items()]
    if sent and job["finished_at"]:
        stages.append(("send (SEG, SR, ORU)", max(sent) - job["finished_at"]))
    return stages


def print_results(console: Console, job: dict[str, Any], timings: list[tuple[str, float]],
                  files: dict[str, Path]) -> None:
    """The report, the ACL finding, the timings per stage and the received files."""
    from aiworker.store.layout import REPORT_FILE

    report = (Path(job["result_dir"]) / REPORT_FILE).read_text(encoding="utf-8")
    console.print(Panel(report.rstrip(), title="Report (report.txt)", expand=False),
                  highlight=False)
    acl = json.loads(job["findings"] or "{}").get("classification", {}).get("acl", {})
    console.print(f"[bold]ACL finding:[/] {acl.get('decision', 'not assessed')}, probability "
                  f"{acl.get('probability', float('nan')):.2f} (threshold "
                  f"{acl.get('threshold', float('nan')):.2f})", highlight=False)
    table = Table(title="Timings per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in timings:
        table.add_row(name, f"{seconds:.2f}")
    console.print(table)
    for label, path in files.items():
        console.print(f"{label}: {path}", highlight=False, soft_wrap=True)


def run_demo(workdir: Path | None, timeout: float, keep: bool, console: Console) -> None:
    """The whole demo (see the module docstring); raises DemoError when it cannot finish."""
    from aiworker.store.layout import PREVIEW_FILE, DataPaths

    workdir = Path(tempfile.mkdtemp(prefix="aiworker-demo-")) if workdir is None else workdir
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"demo folder: {workdir}", highlight=False, soft_wrap=True)
    study = write_phantom(workdir / "study")
    console.print(f"phantom knee study: {len(study.files)} files in {len(study.series)} series, "
                  "ACL torn")
    arrivals = Arrivals()
    pacs, pacs_port = start_pacs(workdir / "pacs", arrivals)
    ris = start_ris(workdir / "ris", arrivals)
    port = free_port()
    config = node_config(workdir, port, pacs_port, ris.port)
    node = None
    try:
        node = start_node(workdir, config, port)
        console.print(f"node AE {AE_TITLE} on 127.0.0.1:{port} (log: {workdir / 'node.log'}); "
                      f"PACS stand-in on port {pacs_port}, RIS stand-in on port "
                      f"{ris.port}", highlight=False, soft_wrap=True)
        push(study, "127.0.0.1", port, AE_TITLE)
        console.print("study sent; waiting for the results ...")
        db_path = DataPaths(workdir / "var").db
        job = wait_for_results(db_path, arrivals, timeout, node)
        print_results(console, job, stage_timings(db_path, job), {
            "SEG received by the PACS": arrivals.dicom_of("SEG"),
            "SR received by the PACS": arrivals.dicom_of("SR"),
            "HL7 ORU^R01 received by the RIS": arrivals.hl7[0],
            "preview PNG (written by the node)": Path(job["result_dir"]) / PREVIEW_FILE})
        if keep:
            _wait_for_ctrl_c(console, config)
    finally:
        if node is not None:
            stop_node(node)
        pacs.shutdown()
        ris.close()


def _wait_for_ctrl_c(console: Console, config: Path) -> None:
    """Keep the node and the stand-ins running until Ctrl-C."""
    console.print(f"the node keeps running: try `aiworker status --config {config}`; "
                  "Ctrl-C stops it", highlight=False, soft_wrap=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def push_study(host: str, port: int, called_aet: str, workdir: Path | None,
               console: Console) -> None:
    """Write the phantom study and C-STORE it to a node already running at host:port."""
    workdir = Path(tempfile.mkdtemp(prefix="aiworker-demo-")) if workdir is None else workdir
    study = write_phantom(workdir.resolve() / "study")
    count = push(study, host, port, called_aet)
    console.print(f"sent {count} files of a phantom knee study (ACL torn) to {called_aet}@"
                  f"{host}:{port}.\nWatch the node work on it, on the node's machine:\n"
                  "  aiworker status --config <the node's config>", highlight=False,
                  soft_wrap=True)
