"""Who may read the dashboard and the API (``web.auth``), over a real socket: the bearer
token or the login form's HttpOnly cookie (``token``), a reverse proxy's user header only
from ``web.trusted_proxies`` (``header``, as behind oauth2-proxy); the probes always open,
``/metrics`` by ``web.metrics_public``; and a node that would show patient data to the
network without sign-in refuses to start.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml
from helpers.node import node_config
from helpers.tools import AIWORKER, free_port
from helpers.web import CHROMIUM, PATIENT_NAME, TOKEN, processed_study, serving, web_config

from aiworker.config_loader import ConfigError, load_config
from aiworker.store.db import StateDB
from aiworker.web.server import WebError, check_exposure

UID = "1.2.826.0.1.3680043.10.7.7"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PAGE = {"Accept": "text/html"}


@pytest.fixture
def db(tmp_path):
    state = StateDB(tmp_path / "state.db")
    processed_study(state, UID, 1_700_000_000.0)
    yield state
    state.close()


def test_token_auth_guards_pages_and_api_but_not_the_probes(db, tmp_path):
    config = web_config(tmp_path, auth="token", token=TOKEN, show_phi=True)
    with serving(db, config) as http:
        for path in ("/api/studies", f"/api/studies/{UID}", "/api/outbox", "/openapi.json",
                     "/docs"):
            refused = http.get(path)
            assert refused.status_code == 401, path
            assert "web.token" in refused.json()["detail"]
            assert PATIENT_NAME not in refused.text
        page = http.get("/", headers=PAGE)
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/"
        assert http.get("/api/studies", headers={"Authorization": "Bearer wrong-token"}
                        ).status_code == 401
        assert http.get("/api/studies", headers=BEARER).json()[0]["patient"]["name"] \
            == PATIENT_NAME
        for path in ("/healthz", "/readyz", "/metrics", "/login"):
            assert http.get(path).status_code in (200, 503), path

        wrong = http.post("/login", data={"token": "nope", "next": "/outbox"})
        assert wrong.status_code == 303 and "failed=1" in wrong.headers["location"]
        assert "aiworker_session" not in http.cookies
        signed = http.post("/login", data={"token": TOKEN, "next": "/outbox"})
        assert signed.status_code == 303 and signed.headers["location"] == "/outbox"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN not in cookie
        assert PATIENT_NAME in http.get("/").text
        assert http.post("/login", data={"token": TOKEN, "next": "//evil.example/"}
                         ).headers["location"] == "/"
        http.post("/logout")
        assert http.get("/api/studies").status_code == 401


def test_metrics_can_be_protected(db, tmp_path):
    config = web_config(tmp_path, auth="token", token=TOKEN, metrics_public=False)
    with serving(db, config) as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers=BEARER).status_code == 200
        assert http.get("/healthz").status_code == 200


def test_header_auth_trusts_the_proxy_only(db, tmp_path):
    header = {"X-Auth-Request-User": "dr.house@example.org"}
    config = web_config(tmp_path, auth="header", auth_header="X-Auth-Request-User",
                        trusted_proxies=["127.0.0.0/8"])
    with serving(db, config) as http:
        assert http.get("/api/studies").status_code == 401
        assert http.get("/api/studies", headers={"X-Forwarded-User": "x"}).status_code == 401
        page = http.get("/", headers=header)
        assert page.status_code == 200 and "signed in as dr.house@example.org" in page.text
        assert http.get("/healthz").status_code == 200
    untrusted = web_config(tmp_path, auth="header", auth_header="X-Auth-Request-User",
                           trusted_proxies=["10.0.0.0/8"])
    with serving(db, untrusted) as http:  # the header from 127.0.0.1: not the proxy
        refused = http.get("/api/studies", headers=header)
        assert refused.status_code == 401 and "proxy" in refused.json()["detail"]


def test_token_auth_needs_a_token(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_config(tmp_path, "n", {"web": {"auth": "token"}})))
    with pytest.raises(ConfigError, match="web.auth: token needs web.token"):
        load_config(path)


def test_patient_data_on_the_network_without_sign_in_refuses_to_start(tmp_path):
    exposed = web_config(tmp_path, show_phi=True, host="0.0.0.0")
    with pytest.raises(WebError, match="web.show_phi is on and web.auth is none"):
        check_exposure(exposed)
    check_exposure(web_config(tmp_path, show_phi=True, host="127.0.0.1"))
    check_exposure(web_config(tmp_path, show_phi=True, host="0.0.0.0", auth="token",
                              token=TOKEN))
    path = tmp_path / "exposed.yaml"
    path.write_text(yaml.safe_dump(node_config(tmp_path, "exposed", {
        "pipelines": [], "web": {"show_phi": True, "host": "0.0.0.0", "port": free_port()}})))
    done = subprocess.run([AIWORKER, "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert "web.show_phi is on and web.auth is none on web.host 0.0.0.0" in done.stderr
    assert "Traceback" not in done.stderr


def test_signing_in_with_chromium(db, tmp_path):
    """A browser is sent to the form, signs in, and its cookie is out of the page's
    scripts' reach (HttpOnly)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): no browser test")
    from playwright.sync_api import sync_playwright

    config = web_config(tmp_path, auth="token", token=TOKEN, show_phi=True)
    with serving(db, config) as http, sync_playwright() as pw:
        base = str(http.base_url).rstrip("/")
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{base}/studies/{UID}")
            page.wait_for_url("**/login?next=**")
            page.fill("#login input[name=token]", "not-the-token")
            page.click("#login button")
            assert "Wrong token" in page.inner_text("#login-failed")
            page.fill("#login input[name=token]", TOKEN)
            page.click("#login button")
            page.wait_for_url(f"**/studies/{UID}")
            assert PATIENT_NAME in page.inner_text("#patient")
            assert page.evaluate("document.cookie") == ""
            page.click("#logout")
            page.wait_for_url("**/login")
            page.goto(base + "/")
            page.wait_for_url("**/login?next=**")
        finally:
            browser.close()
