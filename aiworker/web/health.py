"""``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process serves HTTP (a liveness probe). ``/readyz``
runs every readiness check and answers 200 when all pass, else 503; its JSON body names
each check, whether it passed and why not::

    {"ready": false, "failed": ["disk"],
     "checks": {"database": {"ok": true, "detail": "..."},
                "disk": {"ok": false, "detail": "312 MB free below storage.min_free_mb ..."}}}

The checks here are the ones the web layer can make itself: ``database`` (the state DB
takes a write) and ``disk`` (free space on the spool's disk above ``storage.min_free_mb``,
the floor below which C-STORE answers 0xA700). The node adds ``models`` and ``scp``
(:mod:`aiworker.node`). A check that raises counts as failed, with the error as detail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from aiworker.config import Config
from aiworker.store.db import StateDB
from aiworker.store.disk import free_mb
from aiworker.store.layout import DataPaths

Probe = Callable[[], tuple[bool, str]]  # -> (passed, detail in words)

router = APIRouter(tags=["health"])


def database_probe(db: StateDB) -> Probe:
    """The state DB takes a write (one row of its ``health`` table)."""
    def probe() -> tuple[bool, str]:
        db.probe_write()
        return True, f"state DB {db.path} writable"
    return probe


def disk_probe(config: Config) -> Probe:
    """Free space where the spool is, above ``storage.min_free_mb``."""
    paths = DataPaths(config.storage.data_dir)
    floor_mb = config.storage.min_free_mb

    def probe() -> tuple[bool, str]:
        where = paths.spool if paths.spool.exists() else paths.root
        free = free_mb(where)
        if free < floor_mb:
            return False, (f"{free} MB free on {where}, below storage.min_free_mb "
                           f"({floor_mb} MB): C-STORE answers 0xA700, no job starts")
        return True, f"{free} MB free on {where} (floor {floor_mb} MB)"
    return probe


def run_probes(probes: dict[str, Probe]) -> dict[str, Any]:
    """Every check's outcome, and the names of those that failed."""
    checks: dict[str, dict[str, Any]] = {}
    for name, probe in probes.items():
        try:
            ok, detail = probe()
        except Exception as exc:  # a check that cannot run has failed
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        checks[name] = {"ok": bool(ok), "detail": detail}
    failed = [name for name, check in checks.items() if not check["ok"]]
    return {"ready": not failed, "failed": failed, "checks": checks}


@router.get("/healthz", summary="Liveness: the process serves HTTP")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: DB writable, disk above floor, models, SCP",
            responses={503: {"description": "a check failed; the body names it"}})
def readyz(request: Request) -> JSONResponse:
    outcome = run_probes(request.app.state.web.probes)
    return JSONResponse(outcome, status_code=200 if outcome["ready"] else 503)


def scp_probe(receiver: Any, port: int) -> Probe:
    """The DICOM listener (a :class:`~aiworker.receive.scp.Receiver` or the receiving
    processes) serves its port."""
    def probe() -> tuple[bool, str]:
        if receiver.listening():
            return True, f"DICOM port {port} served"
        return False, f"DICOM port {port} not served (listener stopped or a receiving " \
                      "process died)"
    return probe


def models_probe(inferrer: Any) -> Probe:
    """The pipelines' models: found in the registry at start (else the node would not
    run); once the inference process has started (with the stage) it loaded every one."""
    return inferrer.readiness
