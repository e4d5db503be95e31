"""The parts of the scale-out benchmark (bench/scale.py): the phantom studies it sends, the
peers (dcmtk ``storescp`` as the PACS, an MLLP receiver as the RIS), one setup under test
(the single ``aiworker serve`` on SQLite, or ``serve --role receive`` plus N
``aiworker worker`` on PostgreSQL), reads of its state, and the mirror of procrastinate's
job events that the latency figures come from.

procrastinate records a ``deferred`` and a ``started`` event per job in
``procrastinate_events``, but the workers delete a job that succeeded (``delete_jobs:
successful``) and its events with it; the mirror (a trigger the benchmark adds to the
benchmark's own database, nothing of aiworker's) copies each event as it is written.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    PROCS,
    ROOT,
    START_TIMEOUT_S,
    clean_env,
    find_aiworker,
    find_dcmtk,
    free_port,
    rows,
    tail,
    wait_for_port,
)

ROLES = ("sag_pd_fs",)
MATRIX = 64
MIRROR_SQL = """
CREATE TABLE bench_job_events (job_id bigint, queue text, type text, at timestamptz,
                               scheduled_at timestamptz);
CREATE FUNCTION bench_copy_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_job_events
        SELECT NEW.job_id, j.queue_name, NEW.type::text, NEW.at, j.scheduled_at
        FROM procrastinate_jobs j WHERE j.id = NEW.job_id;
    RETURN NEW;
END $$;
CREATE TRIGGER bench_copy_event AFTER INSERT ON procrastinate_events
    FOR EACH ROW EXECUTE FUNCTION bench_copy_event();
"""
# Per procrastinate job: its first start less when it became due (deferred, or scheduled).
LATENCY_SQL = """
SELECT queue, EXTRACT(EPOCH FROM MIN(at) FILTER (WHERE type = 'started')
       - GREATEST(MIN(at) FILTER (WHERE type = 'deferred'), MIN(scheduled_at))) AS wait_s,
       EXTRACT(EPOCH FROM MIN(at) FILTER (WHERE type = 'deferred')) AS deferred_at
FROM bench_job_events GROUP BY queue, job_id
HAVING MIN(at) FILTER (WHERE type = 'started') IS NOT NULL
   AND MIN(at) FILTER (WHERE type = 'deferred') IS NOT NULL
"""


def write_studies(folder: Path, count: int, first_seed: int) -> list[Path]:
    """``count`` one-series phantom knee studies (sagittal PD FS, 64x64); their folders."""
    from aiworker.phantom.protocol import Overrides
    from aiworker.phantom.study import StudyOptions, write_study

    out = []
    for n in range(count):
        study = write_study(folder / f"s{n:03d}", StudyOptions(
            seed=first_seed + n, rescan=False, derived=False, truth=False, volume_spacing=3.0,
            overrides=Overrides(roles=ROLES, matrix=MATRIX)))
        out.append(study.dicom_dir)
    return out


def send(port: int, folders: list[Path], timeout_s: float = 600) -> None:
    """dcmtk's storescu: every file of ``folders`` on one association."""
    done = subprocess.run([find_dcmtk("storescu") or "storescu", "+sd", "+r", "-aec",
                           "AIWORKER", "127.0.0.1", str(port), *map(str, folders)],
                          env=clean_env(True), capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stdout}{done.stderr}")


def start_pacs(folder: Path) -> int:
    """dcmtk's storescp as the PACS (``--fork``: one process per association, so workers
    sending at once do not queue behind each other); its port."""
    folder.mkdir(parents=True)
    port, log = free_port(), folder.parent / "pacs.log"
    proc = PROCS.start([find_dcmtk("storescp") or "storescp", "--fork", "-aet", "PACS",
                        "-od", str(folder), "+uf", str(port)], clean_env(True), log)
    wait_for_port(port, proc, log, START_TIMEOUT_S)
    return port


def node_config(data_dir: Path, pacs_port: int, ris_port: int, url: str | None,
                stable_s: float) -> dict[str, Any]:
    """One config for every process of a setup; ``url`` None: the SQLite file."""
    config: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(data_dir), "min_free_mb": 1},
        "completion": {"series_stable_seconds": stable_s},
        "destinations": {
            "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs_port,
                     "ae_title": "PACS"},
            "ris": {"kind": "hl7", "host": "127.0.0.1", "port": ris_port}},
        "pipelines": [{"name": "knee", "rules": "config/rules/knee.yaml",
                       "model": "knee-demo", "send_to": ["pacs", "ris"]}],
        "dispatch": {"interval_s": 0.2},
        "web": {"host": "127.0.0.1", "port": free_port(), "enabled": url is None},
        "inference": {"device": "cpu", "threads": 1},
        "logging": {"level": "INFO"}}
    if url:
        config["state"] = {"url": url}
    return config


@dataclass
class Setup:
    """One setup under test, started: its DICOM port, its state (SQLite file or URL)."""

    label: str
    workers: int  # 0: the single SQLite process
    folder: Path
    config: dict[str, Any]
    state: str = ""
    port: int = 0
    mark: int = field(default=0)

    @property
    def postgresql(self) -> bool:
        return self.workers > 0

    def start(self) -> None:
        """Start the processes and return once every one is ready (models loaded)."""
        self.mark = len(PROCS.started)
        path = self.folder / "aiworker.yaml"
        path.write_text(json.dumps(self.config, indent=2))
        self.port = self.config["node"]["port"]
        base = [*find_aiworker()]
        role = ["--role", "receive"] if self.postgresql else []
        log = self.folder / "node.log"
        node = PROCS.start([*base, "serve", "--config", str(path), *role], clean_env(True),
                           log, cwd=ROOT)
        wait_for_port(self.port, node, log, START_TIMEOUT_S)
        if not self.postgresql:
            self.state = str(Path(self.config["storage"]["data_dir"]) / "state.db")
            wait_ready(self.config["web"]["port"], node, log)
            return
        self.state = self.config["state"]["url"]
        procs = [PROCS.start([*base, "worker", "--config", str(path)], clean_env(True),
                             self.folder / f"worker{n}.log", cwd=ROOT)
                 for n in range(1, self.workers + 1)]
        wait_workers(self.state, procs, self.folder)
        pg_execute(self.state, MIRROR_SQL)

    def stop(self) -> None:
        PROCS.stop_since(self.mark)

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        return query(self.state, sql, params)


def wait_ready(web_port: int, proc: subprocess.Popen, log: Path) -> None:
    """Until the single node's /readyz answers 200 (its model loaded)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/readyz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"the node not ready after {START_TIMEOUT_S:.0f} s:\n{tail(log)}")


def wait_workers(url: str, procs: list[subprocess.Popen], folder: Path) -> None:
    """Until every worker is in the workers table with its model's device (loaded)."""
    deadline = time.monotonic() + START_TIMEOUT_S * max(1, len(procs) // 2)
    while time.monotonic() < deadline:
        for n, proc in enumerate(procs, 1):
            if proc.poll() is not None:
                raise RuntimeError(f"worker {n} exited with {proc.returncode}:\n"
                                   f"{tail(folder / f'worker{n}.log')}")
        ready = query(url, "SELECT devices FROM workers")
        if sum(1 for r in ready if json.loads(r["devices"] or "{}")) == len(procs):
            return
        time.sleep(0.3)
    raise RuntimeError(f"not all {len(procs)} workers ready after the wait:\n"
                       f"{tail(folder / 'worker1.log')}")


def query(state: str, sql: str, params: tuple = ()) -> list[dict]:
    """Rows of the state DB: a SQLite file read-only, or PostgreSQL (``?`` placeholders)."""
    if not state.startswith("postgresql://"):
        try:
            return rows(Path(state), sql, params)
        except sqlite3.OperationalError:
            return []  # not created yet
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(state, autocommit=True, row_factory=dict_row) as conn:
        return [dict(r) for r in conn.execute(sql.replace("?", "%s"), params).fetchall()]


def pg_execute(url: str, script: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(script)


def queue_waits(url: str, since: float, until: float) -> dict[str, list[float]]:
    """Seconds from due to started of every procrastinate job deferred between ``since``
    and ``until`` (epoch seconds), per stage queue (``infer/<model>`` counted as ``infer``),
    from the mirror of ``procrastinate_events``."""
    out: dict[str, list[float]] = {}
    for row in query(url, LATENCY_SQL):
        if since <= float(row["deferred_at"]) < until:
            queue = row["queue"].split("/")[0]  # infer/<model>: one infer queue per model
            out.setdefault(queue, []).append(max(0.0, float(row["wait_s"])))
    return out


def pacs_received(folder: Path) -> list[tuple[str, str]]:
    """(Modality, SOP Instance UID) of each file storescp wrote."""
    import pydicom

    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((str(ds.Modality), str(ds.SOPInstanceUID)))
    return out
