"""Who is asking, and may they act?  The two FastAPI dependencies of every guarded route.

``[status] token`` empty (allowed only on loopback): everything is open to this machine and the
user is "local".  Otherwise ``Authorization: Bearer <token>`` (user "token") or HTTP basic auth
with the token as password (the user name is recorded as who acted).  Acting is refused on the
read-only page (``glio-node status-page``) and for form posts from another origin.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request

from glio_node.config import StatusSettings

READ_ONLY_MESSAGE = (
    "this is the read-only status page (glio-node status-page): act from the page of a node "
    "started with glio-node serve"
)


def user_dependency(status: StatusSettings) -> Callable[[Request], str]:
    """A dependency answering the user's name, or 401 with how to authenticate."""

    def user(request: Request) -> str:
        if not status.token:
            return "local"
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), status.token.encode()):
            return "token"
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                name, password = "", ""
            if hmac.compare_digest(password.encode(), status.token.encode()):
                return name[:64] or "basic"
        raise HTTPException(
            401,
            "a token is required: send 'Authorization: Bearer <[status] token>' or log in with "
            "the token as password",
            headers={"WWW-Authenticate": 'Basic realm="glio-node", charset="UTF-8"'},
        )

    return user


def actor_dependency(user: Callable[[Request], str], read_only: bool) -> Callable[..., str]:
    """A dependency answering an operator allowed to act (403 on the read-only page or cross-origin)."""

    def actor(request: Request, who: str = Depends(user)) -> str:
        if read_only:
            raise HTTPException(403, READ_ONLY_MESSAGE)
        # A browser sends Origin on every form post; "null" comes from sandboxed frames and
        # file: pages, i.e. never from this page, so it is refused like any other origin.
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            raise HTTPException(403, f"form posted from another origin ({origin}): refused")
        return who

    return actor


__all__ = ["READ_ONLY_MESSAGE", "actor_dependency", "user_dependency"]
