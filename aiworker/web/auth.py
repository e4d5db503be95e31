"""The token that resend and retry over HTTP must carry (``web.token``).

The API takes it as ``Authorization: Bearer <token>``; the dashboard's buttons post it in a
form field the operator types it into (the page keeps it in the browser tab's session
storage, so it is typed once per tab). A request without the right token changes nothing,
so a page elsewhere cannot make an operator's browser resend (no cross-site request
forgery). With ``web.token`` unset every such request is refused: the dashboard is then
read-only.
"""

from __future__ import annotations

import hmac
from typing import Annotated

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
