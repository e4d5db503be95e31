"""Scale-out on a real PostgreSQL: two receiving nodes (``serve --role receive``) and
``aiworker worker`` processes share one database and one data folder. Studies sent to
either receiver are selected, inferred and delivered by the workers, through every crash a
scaled-out site meets:

- a receiver killed with ``kill -9`` mid-transfer: the sender's resend to the other
  receiver is stored once;
- a worker killed while it infers: its job is finished by another worker;
- the workers killed while one of them sends (waiting for the RIS's ACK): the new worker
  sends the same objects and the same HL7 control id again, nothing else.

The PACS gets every SEG and SR (a C-STORE cut off by a kill is sent again: at least
once, with the same UIDs), the RIS one control id per study, no instance is lost, no
job is done twice, and a job for a model no worker holds waits for one that does.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import yaml
from helpers.node import NodeProcess, node_config
from helpers.tools import AIWORKER, free_port, wait_until
from pynetdicom import AE
from test_dispatch_outbox import StoreSCP
from test_dispatch_stage import dicom, hl7
from test_infer_e2e import send

from aiworker.dispatch.mllp import MllpReceiver
from aiworker.dispatch.requestor import associate
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study
from aiworker.store.db import StateDB
from aiworker.store.handoff import infer_queue
from aiworker.store.jobs import NewJob, queue_job
from aiworker.store.layout import SEG_FILE, SR_FILE

ACK_DELAY_S = 4.0  # the RIS's slowness while the test kills the workers mid-send


class SlowRis:
    """An MLLP listener that keeps every message and, while ``slow`` is set, waits
    :data:`ACK_DELAY_S` before its ACK (``waiting`` counts the messages it sits on)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.slow = threading.Event()
        self.slow.set()
        self.waiting = 0
        self.server = MllpReceiver(self._answer)

    def _answer(self, message: str) -> tuple[str, str]:
        self.messages.append(message)
        if self.slow.is_set():
            self.waiting += 1
            time.sleep(ACK_DELAY_S)
            self.waiting -= 1
        return "AA", ""

    def control_ids(self) -> list[str]:
        return [re.split(r"[|\r]", m)[9] for m in self.messages]


def _config(tmp_path: Path, pg_url: str, scp_port: int, ris_port: int) -> dict[str, Any]:
    return node_config(tmp_path, "site", {
        "state": {"url": pg_url},
        "completion": {"series_stable_seconds": 3.0},
        "destinations": {"pacs": dicom(scp_port), "ris": hl7(ris_port)},
        "pipelines": [{"name": "knee", "rules": "config/rules/knee.yaml",
                       "model": "knee-demo", "send_to": ["pacs", "ris"]}],
        "dispatch": {"interval_s": 0.2, "timeout_s": 8},
        "inference": {"threads": 1}, "web": {"enabled": False}})


def _receiver(tmp_path: Path, config: dict[str, Any], name: str,
              web_port: int | None = None) -> NodeProcess:
    """A receiver of the site's config on its own DICOM port (and dashboard port), not
    started yet."""
    own = dict(config, node=dict(config["node"], port=free_port()),
               web={"enabled": web_port is not None, "port": web_port or free_port()})
    return NodeProcess(tmp_path, name, own, args=("--role", "receive"))


def _worker(tmp_path: Path, config: dict[str, Any], name: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([AIWORKER, "worker", "--config", str(path)], stdout=log,
                            stderr=log, cwd=tmp_path)


def _half_then_kill(receiver: NodeProcess, study: WrittenStudy) -> None:
    """C-STORE half the study on one association, then ``kill -9`` the receiver with the
    association still open."""
    files = sorted(study.dicom_dir.rglob("*.dcm"))
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(str(pydicom.dcmread(files[0], stop_before_pixels=True)
                                 .SOPClassUID))
    assoc = associate(ae, "127.0.0.1", receiver.port, ae_title=receiver.ae_title)
    assert assoc.is_established
    for path in files[:len(files) // 2]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    receiver.kill9()
    receiver.proc.wait(10)
    assoc.abort()


def _unheld_job(db: StateDB, study_uid: str) -> str:
    """Queue a job for a model no worker holds, as a site's other pipeline would."""
    job = NewJob("other", "other-model", study_uid, {"sag_pd_fs": "1.2.3.4"})
    with db.transaction() as cur:
        job_id, _ = queue_job(cur, job, time.time())
        db.handoff.infer(cur, job_id, job.model)
    return job_id


def _the_dashboard_lists(web_port: int, pid: int) -> None:
    """The receiver's dashboard lists the running worker with its model on the CPU."""
    base = f"http://127.0.0.1:{web_port}"
    with urllib.request.urlopen(f"{base}/api/workers", timeout=10) as resp:
        listed = {w["worker"]: w for w in json.load(resp)}
    [name] = [name for name in listed if name.endswith(f":{pid}")]
    assert listed[name]["devices"] == {"knee-demo": "cpu"} and not listed[name]["silent"]
    assert listed[name]["queues"] == ["select", "infer", "results", "outbox"]
    with urllib.request.urlopen(f"{base}/workers", timeout=10) as resp:
        page = resp.read().decode()
    assert name in page and "knee-demo (cpu)" in page


def _pid(job: dict[str, Any]) -> int:
    return int(job["worker"].rsplit(":", 1)[1])


def test_two_receivers_and_workers_on_postgresql_survive_kill_9_anywhere(
        tmp_path: Path, pg_url: str) -> None:
    scp = StoreSCP(tmp_path / "pacs").start()
    ris = SlowRis()
    config = _config(tmp_path, pg_url, scp.port, ris.server.port)
    web_port = free_port()
    first = _receiver(tmp_path, config, "receiver1", web_port)
    second = _receiver(tmp_path, config, "receiver2")
    workers: dict[str, subprocess.Popen] = {}
    db = StateDB(pg_url)
    try:
        first.start()
        second.start()
        workers = {f"worker{n}": _worker(tmp_path, config, f"worker{n}") for n in (1, 2)}
        studies = [write_study(tmp_path / f"knee{seed}", StudyOptions(
            seed=seed, rescan=False, derived=False,
            overrides=Overrides(roles=("sag_pd_fs",), matrix=64))) for seed in (54, 55)]
        unheld = _unheld_job(db, "1.2.3")
        send(first, studies[0])
        _half_then_kill(second, studies[1])
        send(first, studies[1])  # the modality's resend, to the receiver still up

        running = wait_until(lambda: db.query(
            "SELECT * FROM jobs WHERE state = 'running' AND model = 'knee-demo'"), 120,
            "a worker running a job")[0]
        killed = next(name for name, proc in workers.items() if proc.pid == _pid(running))
        workers.pop(killed).kill()  # kill -9 mid-inference
        workers["worker3"] = _worker(tmp_path, config, "worker3")

        wait_until(lambda: ris.waiting, 180, "a worker waiting for the RIS's ACK")
        for proc in workers.values():
            proc.kill()  # kill -9 mid-send: one of them sits on the unacknowledged report
        ris.slow.clear()
        workers = {"worker4": _worker(tmp_path, config, "worker4")}
        wait_until(lambda: db.query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'sent'"
                                    )[0]["n"] == 6, 180,
                   "each study's SEG and SR at the PACS and report at the RIS")

        jobs = {job.job_id: job for job in db.jobs() if job.model == "knee-demo"}
        assert len(jobs) == 2 and all(job.state == "done" for job in jobs.values())
        assert jobs[running["job_id"]].attempts >= 2
        expected = sorted(str(pydicom.dcmread(Path(job.result_dir) / name,
                                              stop_before_pixels=True).SOPInstanceUID)
                          for job in jobs.values() for name in (SEG_FILE, SR_FILE))
        arrived = Counter(scp.received_uids())
        assert sorted(arrived) == expected
        # at-least-once: a C-STORE cut off by one of the two kills is sent again
        assert max(arrived.values()) <= 1 + 2
        controls = Counter(ris.control_ids())
        assert len(controls) == 2 and max(controls.values()) >= 2  # the one cut off
        assert len(set(ris.messages)) == 2  # a resend is the same message
        assert db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == \
            sum(len(study.files) for study in studies)
        events = Counter(e["kind"] for e in db.events(limit=1000))
        assert events["job_done"] == 2
        assert [job.state for job in db.jobs() if job.job_id == unheld] == ["queued"]
        _the_dashboard_lists(web_port, workers["worker4"].pid)
        assert [row["status"] for row in db.query(
            "SELECT status FROM procrastinate_jobs WHERE queue_name = ?",
            (infer_queue("other-model"),))] == ["todo"]
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        for receiver in (first, second):
            receiver.close()
        db.close()
        ris.server.close()
        scp.stop()
