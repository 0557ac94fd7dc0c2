"""The one place that builds the HTTP ``Authorization`` header for DICOMweb requests.

Shared by STOW-RS (:mod:`glio_node.send.dicomweb`) and the pull mode's QIDO-RS / WADO-RS
(:mod:`glio_node.pull.dicomweb`), so basic and bearer auth behave the same in both directions.
The header holds a secret: callers never log it (nor the request headers).
"""

from __future__ import annotations

import base64


def authorization_header(
    *, username: str = "", password: str = "", bearer_token: str = ""
) -> dict[str, str]:
    """``{"Authorization": ...}`` for a bearer token or basic auth; ``{}`` for neither.

    A bearer token wins over a username (the settings refuse both at once).
    """
    if bearer_token:
        return {"Authorization": f"Bearer {bearer_token}"}
    if username:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    return {}
