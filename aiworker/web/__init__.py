"""The node's HTTP side: dashboard pages, a JSON REST API, health and Prometheus metrics.

:func:`~aiworker.web.app.create_app` builds the FastAPI application over a state DB and
the config; :class:`~aiworker.web.server.WebServer` serves it from a thread of ``aiworker
serve`` on ``web.host:web.port`` (127.0.0.1:8080 by default).

* pages (rendered on the server, no script build): ``/`` studies, ``/studies/{uid}`` one
  study, ``/failures``;
* API: ``/api/...`` (OpenAPI at ``/openapi.json``, browsable at ``/docs``); the POSTs
  (resend, retry) need ``Authorization: Bearer <web.token>``;
* ``/healthz`` (the process answers), ``/readyz`` (ready to take studies; 503 with the
  failed checks otherwise), ``/metrics`` (Prometheus text format).

Patient name and ID appear only with ``web.show_phi: true``. The web layer reads and
re-queues through :mod:`aiworker.store`; it imports no stage above it.
"""

from aiworker.web.app import create_app

__all__ = ["create_app"]
