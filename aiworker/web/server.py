"""Serving the web application from a thread of the node (uvicorn).

The port is bound here first, so a port in use is a clear :class:`WebError` at start (the
node exits 1) instead of a log line from inside uvicorn; uvicorn then serves on that
socket until :meth:`WebServer.stop` sets its ``should_exit``. Uvicorn's access log is off
(the node's log stays PHI-free and quiet); its errors go to the node's log.

uvicorn's ``proxy_headers`` are off: the client address the app sees is the TCP peer, and
the node itself decides whom to believe (``web.trusted_proxies``, :mod:`.auth`). With them
on, uvicorn would replace a same-host proxy's address by its ``X-Forwarded-For`` first, so
``web.auth: header`` would refuse the proxy's users and believe a forged header.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from aiworker.config import Config
from aiworker.web.health import models_probe, scp_probe

log = logging.getLogger("aiworker.web")

START_TIMEOUT_S = 15.0


class WebError(Exception):
    """The web server cannot start (its port is taken, its address is not ours)."""


class WebServer:
    """One uvicorn server for ``app`` on ``host:port``, run in a daemon thread."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.host = host
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, lifespan="on",
            timeout_graceful_shutdown=5, proxy_headers=False))
        self._thread: threading.Thread | None = None
        self.refusal: WebError | None = None  # a reason not to start, raised by start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Bind the port and serve; returns once requests are answered. Raises
        :class:`WebError` when the port cannot be bound or the server does not start, or
        the config's :attr:`refusal` (see :func:`check_exposure`)."""
        if self.refusal is not None:
            raise self.refusal
        sock = self._bind()
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                        name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise WebError(f"the web server on {self.host}:{self.port} did not start "
                               "(see the log above)")
            time.sleep(0.02)
        log.info("dashboard, API and metrics on %s", self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets
        # whose proto says TCP; with 0 each answer on a kept-alive connection waited ~40 ms
        # for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise WebError(f"cannot listen for HTTP on {self.host}:{self.port} (web.host, "
                           f"web.port): {exc.strerror}; is another node or program using "
                           "the port? Choose another web.port, or web.enabled: false") from exc
        sock.listen(128)
        sock.set_inheritable(True)
        return sock


def node_web_server(config: Config, db_path: Path | str, receiver: Any, inferrer: Any
                    ) -> WebServer | None:
    """The node's web server (None with ``web.enabled: false``): the app over its state DB
    with the node's readiness checks, ``scp`` and ``models``, beside the built-in ones."""
    if not config.web.enabled:
        return None
    from aiworker.web.app import create_app

    probes = {"models": models_probe(inferrer)}
    if receiver is not None:  # an ``aiworker worker`` receives nothing
        probes["scp"] = scp_probe(receiver, config.node.port)
    app = create_app(db_path, config, probes)
    server = WebServer(app, config.web.host, config.web.port)
    try:
        check_exposure(config)
    except WebError as refused:
        server.refusal = refused  # raised by start(), where the node reports a WebError
    return server


def check_exposure(config: Config) -> None:
    """Refuse patient data on the network without sign-in: ``web.show_phi`` with
    ``web.auth: none`` is allowed only on a loopback ``web.host``."""
    web = config.web
    if web.show_phi and web.auth == "none" and not _loopback(web.host):
        raise WebError(f"web.show_phi is on and web.auth is none on web.host {web.host}: "
                       "anyone who reaches the port would see patient data; set web.auth "
                       "(token or header), or web.host: 127.0.0.1, or web.show_phi: false")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
