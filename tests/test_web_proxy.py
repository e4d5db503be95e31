"""Behind a reverse proxy on the same host: the node decides itself whom to believe
(web.trusted_proxies, against the TCP peer), so uvicorn must not rewrite the client address
from X-Forwarded-For first. A request from 127.0.0.1 carrying X-Forwarded-For and the
user header is let in when 127.0.0.1 is a trusted proxy, whatever address it forwards, and
refused when only the forwarded address would be trusted (a spoofed header)."""

from __future__ import annotations

import pytest
from helpers.web import TOKEN, serving, web_config

from aiworker.store.db import StateDB

HEADERS = {"X-Forwarded-For": "10.1.2.3", "X-Forwarded-User": "alice@example.org",
           "X-Forwarded-Proto": "https"}


@pytest.mark.parametrize(("proxies", "expected"), [
    (["127.0.0.1"], 200),       # the proxy on this host: its forwarded client is not the peer
    (["10.0.0.0/8"], 401),      # only the forwarded address is "trusted": a spoof, refused
])
def test_the_peer_not_x_forwarded_for_decides_header_sign_in(tmp_path, proxies, expected):
    config = web_config(tmp_path, auth="header", trusted_proxies=proxies)
    db = StateDB(tmp_path / "state.db")
    try:
        with serving(db, config) as http:
            answer = http.get("/api/studies", headers=HEADERS)
            assert answer.status_code == expected, answer.text
            assert http.get("/api/studies", headers={"X-Forwarded-User": "alice"}
                            ).status_code == expected
    finally:
        db.close()


@pytest.mark.parametrize(("proxies", "secure"), [(["127.0.0.1"], True), ([], False)])
def test_the_login_cookie_is_secure_behind_a_trusted_https_proxy(tmp_path, proxies, secure):
    config = web_config(tmp_path, auth="token", token=TOKEN, trusted_proxies=proxies)
    db = StateDB(tmp_path / "state.db")
    try:
        with serving(db, config) as http:
            answer = http.post("/login", data={"token": TOKEN, "next": "/"},
                               headers={"X-Forwarded-Proto": "https"})
            assert answer.status_code == 303
            cookie = answer.headers["set-cookie"]
            assert "aiworker_session=" in cookie and ("secure" in cookie.lower()) == secure
    finally:
        db.close()
