"""Retention: delivered studies leave the node by age, by the emergency disk floor, or when an
operator purges them, with the spool, the results and the state DB kept in agreement.

A real node (the tiny model of test_infer_worker.py, results sent to a real storescp) runs
the studies; ``aiworker purge`` and the retention stage remove them; the state DB, the
folders and /metrics are read back.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.tools import dcmtk, free_port, needs_dcmtk, wait_until
from helpers.web import metrics
from test_infer_e2e import send, tiny_node

from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study
from aiworker.store import retention
from aiworker.store.db import StateDB
from aiworker.store.layout import DataPaths
from aiworker.store.retention import RetentionPolicy, apply_retention


def small_study(folder: Path, seed: int) -> WrittenStudy:
    return write_study(folder, StudyOptions(
        seed=seed, vendor="ge", rescan=False, derived=False, truth=False, volume_spacing=3.0,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=32, slices=16)))


@pytest.fixture
def pacs(tmp_path: Path):
    """dcmtk's storescp, writing what it receives under ``pacs/``."""
    import subprocess

    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "--fork", "-od", str(folder), "-aet", "PACS",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: dcmtk("echoscu", "-aec", "PACS", "127.0.0.1", str(port)
                             ).returncode == 0, 10, "storescp listening")
    yield {"port": port, "folder": folder}
    proc.terminate()
    proc.wait(10)


def delivering_node(node_factory, tmp_path: Path, pacs_port: int, **storage: Any):
    """A started tiny-model node sending SEG and SR to the PACS at ``pacs_port``, retention
    off unless ``storage`` says otherwise (configured before its one start)."""
    node = tiny_node(node_factory, tmp_path, start=False,
                     storage={"retention_days": 0, "emergency_free_percent": 0} | storage,
                     destinations={"pacs": {"kind": "dicom", "host": "127.0.0.1",
                                            "port": pacs_port, "ae_title": "PACS"}})
    node.reconfigure(pipelines=[node.config["pipelines"][0] | {
        "outputs": ["seg", "sr"], "send_to": ["pacs"]}])
    return node.start()


def delivered(node, study: WrittenStudy) -> None:
    def all_sent() -> bool:
        rows = node.sql("SELECT o.state FROM outbox o WHERE o.study_uid = ?",
                        (study.study_uid,))
        jobs = node.sql("SELECT state FROM jobs WHERE study_uid = ?", (study.study_uid,))
        return bool(rows) and {r["state"] for r in rows} == {"sent"} and \
            [j["state"] for j in jobs] == ["done"]
    wait_until(all_sent, 90, f"study {study.study_uid} delivered", interval=0.2)


def rows_of(node, study_uid: str) -> dict[str, int]:
    counts = {}
    for table in ("studies", "series", "instances", "selections", "jobs", "outbox"):
        counts[table] = node.sql(f"SELECT COUNT(*) AS n FROM {table} WHERE study_uid = ?",
                                 (study_uid,))[0]["n"]
    return counts


NONE_LEFT = dict.fromkeys(("studies", "series", "instances", "selections", "jobs", "outbox"),
                          0)


@needs_dcmtk
def test_purge_forgets_a_study_and_retention_removes_delivered_ones(node_factory, tmp_path,
                                                                    pacs):
    node = delivering_node(node_factory, tmp_path, pacs["port"])
    first, second = small_study(tmp_path / "a", 501), small_study(tmp_path / "b", 502)
    for study in (first, second):
        send(node, study)
        delivered(node, study)
    [first_job] = node.sql("SELECT job_id, result_dir FROM jobs WHERE study_uid = ?",
                           (first.study_uid,))
    assert Path(first_job["result_dir"]).is_dir()
    size = sum(p.stat().st_size for p in (node.spool / first.study_uid).rglob("*.dcm"))

    proc = node.cli("purge", first.study_uid, "--config", str(node.config_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["study", first.study_uid, "removed", "(operator):", "16",
                                   "instance(s),", str(size), "bytes,", "1", "job(s)"]
    assert rows_of(node, first.study_uid) == NONE_LEFT
    assert not (node.spool / first.study_uid).exists()
    assert not Path(first_job["result_dir"]).exists()
    assert rows_of(node, second.study_uid)["instances"] == 16  # the other study is untouched
    [event] = node.events("study_purged")
    assert event["detail"] == {"reason": "operator", "instances": 16, "bytes": size,
                               "jobs": 1}
    assert [s["study_uid"] for s in node.status_json()["studies"]] == [second.study_uid]
    web = httpx.Client(base_url=f"http://127.0.0.1:{node.config['web']['port']}")
    m = metrics(web)
    assert m['aiworker_studies_purged_total{reason="operator"}'] == 1
    assert m["aiworker_purged_bytes_total"] == size

    unknown = node.cli("purge", "1.2.3.4", "--config", str(node.config_path))
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "purge: no study 1.2.3.4")
    nothing = node.cli("purge", "--expired", "--config", str(node.config_path))
    assert (nothing.returncode, nothing.stdout.strip()) == (0, "nothing to remove")

    # the retention stage of the running node, by age: a study delivered a second ago goes
    node.reconfigure(storage={"retention_days": 1 / 86400, "retention_interval_s": 0.5})
    node.restart()
    wait_until(lambda: rows_of(node, second.study_uid) == NONE_LEFT, 20,
               "the second study removed by age")
    assert not (node.spool / second.study_uid).exists()
    assert [e["detail"]["reason"] for e in node.events("study_purged")] == ["operator", "age"]
    assert node.spool_files() == [] and node.running


@needs_dcmtk
def test_a_study_not_yet_delivered_stays_until_an_operator_purges_it(node_factory, tmp_path):
    node = delivering_node(node_factory, tmp_path, free_port(),  # nothing listens there
                           retention_days=1 / 86400, retention_interval_s=0.5)
    study = small_study(tmp_path / "a", 511)
    send(node, study)
    wait_until(lambda: node.sql("SELECT state FROM outbox WHERE study_uid = ? AND attempts > 0",
                                (study.study_uid,)), 60, "a failed send to the PACS")
    time.sleep(1.5)  # three retention passes, each of which must keep the study
    proc = node.cli("purge", "--expired", "--config", str(node.config_path))
    assert (proc.returncode, proc.stdout.strip()) == (0, "nothing to remove")
    assert rows_of(node, study.study_uid)["instances"] == 16
    assert node.events("study_purged") == []

    forget = node.cli("purge", study.study_uid, "--config", str(node.config_path))
    assert forget.returncode == 0, forget.stderr
    assert rows_of(node, study.study_uid) == NONE_LEFT
    assert node.spool_files() == []
    assert node.running


def test_emergency_cleaning_removes_the_oldest_delivered_studies_first(tmp_path, monkeypatch):
    paths = DataPaths(tmp_path / "var")
    db = StateDB(paths.db)
    retention.open_tables(db)
    now = time.time()
    for n, age in ((1, 300), (2, 200), (3, 100)):
        _delivered_study(db, paths, f"2.25.{n}", now - age)
    _delivered_study(db, paths, "2.25.4", now - 400, job_state="failed")  # kept: failed
    readings = iter([4.0, 4.0, 30.0])  # free percent before each removal
    monkeypatch.setattr(retention, "free_percent", lambda _folder: next(readings))
    purged = apply_retention(db, paths, RetentionPolicy(retention_days=0,
                                                        emergency_free_percent=10))
    assert [(p.study_uid, p.reason) for p in purged] == [("2.25.1", "disk"), ("2.25.2", "disk")]
    left = [row["study_uid"] for row in db.query("SELECT study_uid FROM studies")]
    assert sorted(left) == ["2.25.3", "2.25.4"]
    assert (paths.spool / "2.25.3" / "2.25.3.1" / "2.25.3.1.1.dcm").exists()
    assert not (paths.spool / "2.25.1").exists()
    db.close()
    shutil.rmtree(paths.root)


def test_a_done_job_the_outbox_has_not_taken_yet_keeps_its_study(tmp_path):
    """Between a job's end and the outbox stage queuing its rows, the study has no unsent
    row, yet is not delivered (a node lost such a study before its results left); once
    the stage has taken the job (here: its pipeline sends nowhere) it is."""
    paths = DataPaths(tmp_path / "var")
    db = StateDB(paths.db)
    retention.open_tables(db)
    _delivered_study(db, paths, "2.25.7", time.time() - 300, outbox=False)
    with db.transaction() as cur:
        cur.execute("UPDATE jobs SET result_dir = 'r', finished_at = 1 WHERE job_id = 'job2.25.7'")
    policy = RetentionPolicy(retention_days=1 / 86400, emergency_free_percent=0)
    assert [j.job_id for j in db.jobs_to_dispatch()] == ["job2.25.7"]
    assert apply_retention(db, paths, policy) == []
    db.mark_dispatched("job2.25.7")
    assert db.jobs_to_dispatch() == []
    assert [p.study_uid for p in apply_retention(db, paths, policy)] == ["2.25.7"]
    db.close()


def _delivered_study(db: StateDB, paths: DataPaths, uid: str, received: float,
                     job_state: str = "done", outbox: bool = True) -> None:
    """Rows of a complete, selected study with one instance file and a job in
    ``job_state`` whose one outbox row is sent (no row without ``outbox``)."""
    file = paths.spool / uid / f"{uid}.1" / f"{uid}.1.1.dcm"
    file.parent.mkdir(parents=True)
    file.write_bytes(b"\0" * 128)
    with db.transaction() as cur:
        cur.execute("INSERT INTO studies (study_uid, first_received, last_received, state,"
                    " completed_at) VALUES (?, ?, ?, 'complete', ?)",
                    (uid, received, received, received + 10))
        cur.execute("INSERT INTO series (series_uid, study_uid, first_received, last_received,"
                    " state) VALUES (?, ?, ?, ?, 'complete')", (f"{uid}.1", uid, received,
                                                                 received))
        cur.execute("INSERT INTO instances (sop_uid, series_uid, study_uid, path, size, frames,"
                    " received_at, state) VALUES (?, ?, ?, ?, 128, 1, ?, 'stored')",
                    (f"{uid}.1.1", f"{uid}.1", uid, str(file), received))
        cur.execute("INSERT INTO selections VALUES (?, 'knee', ?, ?, 1, '{}')",
                    (uid, received + 10, received + 11))
        cur.execute("INSERT INTO jobs (job_id, job_key, pipeline, model, study_uid, series_uid,"
                    " inputs, state, created_at, updated_at) VALUES (?, ?, 'knee', 'tiny', ?,"
                    " ?, '{}', ?, ?, ?)", (f"job{uid}", f"key{uid}", uid, f"{uid}.1",
                                          job_state, received, received))
        if not outbox:
            return
        cur.execute("INSERT INTO outbox (job_id, study_uid, destination, kind, object_kind,"
                    " path, state, next_attempt_at, created_at, queued_at, updated_at, sent_at)"
                    " VALUES (?, ?, 'pacs', 'dicom', 'seg', 'x', 'sent', 0, 0, 0, 0, ?)",
                    (f"job{uid}", uid, received + 20))
