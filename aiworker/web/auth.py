"""The token that resend and retry over HTTP must carry (``web.token``), and who may read
at all (``web.auth``: none | token | header, see :func:`access_middleware`).

The API takes it as ``Authorization: Bearer <token>``; the dashboard's buttons post it in a
form field the operator types it into (the page keeps it in the browser tab's session
storage, so it is typed once per tab). A request without the right token changes nothing,
so a page elsewhere cannot make an operator's browser resend (no cross-site request
forgery). With ``web.token`` unset every such request is refused: the dashboard is then
read-only.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

DISABLED = ("resend and retry over HTTP are off: set web.token (or AIWORKER_WEB__TOKEN) in "
            "the node's config, or use `aiworker resend` / `aiworker retry` on the node")
MISSING = "this needs the node's web.token: send 'Authorization: Bearer <web.token>'"
WRONG = "wrong token (compare with web.token in the node's config)"

bearer = HTTPBearer(auto_error=False, description="web.token from the node's config")


class TokenRefused(Exception):
    """A mutating request without the right token: ``status`` 403 (no token configured)
    or 401 (none or a wrong one presented)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def check_token(configured: str | None, presented: str | None) -> None:
    """Raise :class:`TokenRefused` unless ``presented`` is the ``configured`` token."""
    if configured is None:
        raise TokenRefused(403, DISABLED, "disabled")
    if not presented:
        raise TokenRefused(401, MISSING, "missing")
    if not hmac.compare_digest(presented.encode(), configured.encode()):
        raise TokenRefused(401, WRONG, "wrong")


def require_token(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """FastAPI dependency of the API's POSTs: the bearer token must be ``web.token``."""
    try:
        check_token(request.app.state.web.config.web.token,
                    credentials.credentials if credentials else None)
    except TokenRefused as refused:
        headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
        raise HTTPException(refused.status, refused.message, headers=headers) from refused


# --- who may read (web.auth) ----------------------------------------------------------

COOKIE = "aiworker_session"
OPEN_PATHS = ("/healthz", "/readyz", "/login", "/logout")
OPEN_PREFIXES = ("/static/",  # the swagger-ui assets: public code, no data
                 "/dicomweb/")  # STOW-RS: every route checks web.token itself (require_token)
LOGIN_NEEDED = "this node's dashboard and API need web.token: send 'Authorization: Bearer " \
               "<web.token>' or sign in at /login"
PROXY_NEEDED = "this node trusts its reverse proxy for sign-in (web.auth: header): go " \
               "through the proxy"


def session_value(token: str) -> str:
    """What the login cookie holds: a keyed digest of the token, not the token itself
    (a changed web.token ends every session)."""
    return hmac.new(token.encode(), b"aiworker-session", "sha256").hexdigest()


def is_open(path: str, metrics_public: bool) -> bool:
    """The paths every caller may read: the probes, the login form, the API docs' assets,
    and ``/metrics`` while ``web.metrics_public``."""
    return (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
            or (metrics_public and path == "/metrics"))


def trusted(host: str | None, proxies: list[str]) -> bool:
    """Whether ``host`` (the TCP peer) is one of ``web.trusted_proxies``."""
    import ipaddress

    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(p, strict=False) for p in proxies)


def via_https(request: Request) -> bool:
    """Whether the browser reached the node over HTTPS: directly, or through one of
    ``web.trusted_proxies`` that says so in ``X-Forwarded-Proto`` (the node's own proxy
    handling: uvicorn's ``proxy_headers`` are off, see :mod:`.server`)."""
    if request.url.scheme == "https":
        return True
    peer = request.client.host if request.client else None
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return forwarded == "https" and trusted(peer, request.app.state.web.config.web.trusted_proxies)


def reader(request: Request) -> str | None:
    """Who is reading: ``"token"``, the proxy's user name, or None when no sign-in is
    asked (``web.auth: none``, or an open path). Raises :class:`TokenRefused` when the
    request may not read at all."""
    web = request.app.state.web.config.web
    if web.auth == "none" or is_open(request.url.path, web.metrics_public):
        return None
    if web.auth == "header":
        user = request.headers.get(web.auth_header, "").strip()
        peer = request.client.host if request.client else None
        if user and trusted(peer, web.trusted_proxies):
            return user
        raise TokenRefused(401, PROXY_NEEDED, "proxy")
    presented = request.cookies.get(COOKIE)
    if presented and hmac.compare_digest(presented, session_value(web.token)):
        return "token"
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials and hmac.compare_digest(
            credentials.strip().encode(), web.token.encode()):
        return "token"
    raise TokenRefused(401, LOGIN_NEEDED, "login")


async def access_middleware(request: Request, call_next: Any) -> Any:
    """Every request but the open ones (:func:`is_open`) passes :func:`reader`: a browser
    asking for a page is sent to the login form (or told to use the proxy), an API
    client gets 401 with a JSON ``detail``."""
    from fastapi.responses import JSONResponse, RedirectResponse

    try:
        request.state.reader = reader(request)
    except TokenRefused as refused:
        wants_page = "text/html" in request.headers.get("accept", "")
        if refused.code == "login" and wants_page and request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        return JSONResponse({"detail": refused.message}, status_code=refused.status,
                            headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


def safe_next(target: str | None) -> str:
    """Where the login form goes after signing in: a path of this site only."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
