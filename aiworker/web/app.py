"""The FastAPI application: pages, API, health and metrics over one state DB.

``create_app(db, config, probes)`` is all a caller needs: the node passes the path of its
state DB (the app opens a connection of its own, so a slow page never holds up the
receivers' writes) and its readiness checks; tests may pass a :class:`StateDB`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

import aiworker
from aiworker.config import Config
from aiworker.receive.instances import InstanceStore
from aiworker.store.db import StateDB
from aiworker.store.layout import DataPaths
from aiworker.store.spool import Spool
from aiworker.web import api, health, pages, stow
from aiworker.web.auth import access_middleware
from aiworker.web.health import Probe, database_probe, disk_probe
from aiworker.web.metrics import node_registry
from aiworker.web.views import Views


@dataclass
class WebContext:
    """What every route reads (``request.app.state.web``)."""

    config: Config
    db: StateDB
    views: Views
    probes: dict[str, Probe]
    templates: Jinja2Templates
    registry: CollectorRegistry


def create_app(db: StateDB | Path | str, config: Config,
               probes: Mapping[str, Probe] | None = None) -> FastAPI:
    """The application over the state DB ``db`` (a path: opened here and closed at
    shutdown). ``probes`` are readiness checks beside the built-in ``database`` and
    ``disk`` ones (the node adds ``models`` and ``scp``)."""
    owned = not isinstance(db, StateDB)
    state_db = StateDB(db, config.state.busy_timeout_s) if owned else db
    stow_store = stow_instances(config, state_db) if config.web.stow_enabled else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if stow_store is not None:
            stow_store.close()
        if owned:
            state_db.close()

    app = FastAPI(title="aiworker", version=aiworker.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="DICOM AI node for knee MRI: studies, jobs, outbox, resend "
                              "and retry (POST, bearer token = web.token), health, metrics.")
    app.state.web = WebContext(
        config=config, db=state_db, views=Views(state_db, config),
        probes={"database": database_probe(state_db), "disk": disk_probe(config),
                **(probes or {})},
        templates=pages.templates(), registry=node_registry(state_db, config.node.port))
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(health.router)
    if stow_store is not None:
        app.state.stow = stow_store
        app.include_router(stow.router)
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["health"],
                      summary="Prometheus metrics", response_class=Response)
    app.mount(SWAGGER_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="swagger-ui")
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.middleware("http")(access_middleware)
    return app


SWAGGER_ASSETS = "/static/swagger-ui"
STOW_WRITERS = 4  # threads writing and fsyncing STOW-RS parts


def stow_instances(config: Config, db: StateDB) -> InstanceStore:
    """The store STOW-RS parts go through: the C-STORE path, on the node's spool."""
    spool = Spool(DataPaths(config.storage.data_dir).spool, fsync=config.storage.fsync)
    return InstanceStore(spool, db, config.storage.min_free_mb, writers=STOW_WRITERS)


def docs(request: Request) -> HTMLResponse:
    """Swagger UI from the package's own copy (swagger-ui-bundle): no CDN, so ``/docs``
    works on a hospital network without internet."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title="aiworker API",
        swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png")


def metrics(request: Request) -> Response:
    """The node's metrics in Prometheus text format (see :mod:`aiworker.web.metrics`)."""
    return Response(generate_latest(request.app.state.web.registry),
                    media_type=CONTENT_TYPE_LATEST)
