"""Scale-out on a real PostgreSQL: a receiving node (``serve --role receive``) and
``aiworker worker`` processes share one database and one data folder. A study sent to the
receiver is selected, inferred and delivered by the workers; a worker killed with ``kill -9``
while it infers has its job finished by another worker, and the PACS and the RIS get each
object once."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import yaml
from support import AIWORKER, NodeProcess, node_config, wait_until
from test_dispatch_outbox import StoreSCP, mllp_listener
from test_dispatch_stage import dicom, hl7
from test_infer_e2e import send

from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.store.db import StateDB
from aiworker.store.layout import SEG_FILE, SR_FILE


def _config(tmp_path: Path, pg_url: str, scp_port: int, ris_port: int) -> dict[str, Any]:
    return node_config(tmp_path, "receiver", {
        "state": {"url": pg_url},
        "destinations": {"pacs": dicom(scp_port), "ris": hl7(ris_port)},
        "pipelines": [{"name": "knee", "rules": "config/rules/knee.yaml",
                       "model": "knee-demo", "send_to": ["pacs", "ris"]}],
        "dispatch": {"interval_s": 0.2, "timeout_s": 5},
        "inference": {"threads": 1}, "web": {"enabled": False}})


def _worker(tmp_path: Path, config: dict[str, Any], name: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([AIWORKER, "worker", "--config", str(path)], stdout=log,
                            stderr=log, cwd=tmp_path)


def test_receiver_and_workers_on_postgresql_survive_a_killed_worker(tmp_path: Path,
                                                                     pg_url: str) -> None:
    scp = StoreSCP(tmp_path / "pacs").start()
    server, received = mllp_listener(reject="\x00never")
    config = _config(tmp_path, pg_url, scp.port, server.port)
    receiver = NodeProcess(tmp_path, "receiver", config, args=("--role", "receive")).start()
    first = _worker(tmp_path, config, "worker1")
    second = None
    db = StateDB(pg_url)
    try:
        study = write_study(tmp_path / "knee", StudyOptions(
            seed=54, rescan=False, derived=False,
            overrides=Overrides(roles=("sag_pd_fs",), matrix=64)))
        send(receiver, study)
        wait_until(lambda: db.query("SELECT 1 FROM jobs WHERE state = 'running'"), 120,
                   "the first worker running the job")
        first.kill()  # kill -9 mid-inference
        first.wait(10)
        second = _worker(tmp_path, config, "worker2")
        wait_until(lambda: db.query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'sent'"
                                    )[0]["n"] == 3, 180,
                   "the SEG and SR at the PACS and the report at the RIS")
        [job] = db.jobs()
        assert job["state"] == "done" and job["attempts"] == 2
        assert job["worker"].endswith(f":{second.pid}")
        folder = Path(job["result_dir"])
        uids = [str(pydicom.dcmread(folder / name, stop_before_pixels=True).SOPInstanceUID)
                for name in (SEG_FILE, SR_FILE)]
        assert scp.received_uids() == sorted(uids)
        assert len(received) == 1
        assert db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == \
            len(study.files)
        events = [e["kind"] for e in db.events(limit=500)]
        assert events.count("job_done") == 1 and events.count("job_started") == 2
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        receiver.close()
        db.close()
        server.close()
        scp.stop()
