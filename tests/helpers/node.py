"""The node under test: ``aiworker serve`` as a subprocess, its config, and the phantom
studies sent to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import yaml

from aiworker.store.layout import DataPaths
from helpers.tools import (
    AIWORKER,
    DEFAULT_CONFIG,
    STARTUP_TIMEOUT_S,
    deep_merge,
    free_port,
    port_open,
    wait_until,
)

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
