"""``/api/intake``: pause and resume intake for every node of the store (audited)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from glio_node.web.acting import act, refusal_as_409
from glio_node.web.context import WebContext, client_address


def router(web: WebContext) -> APIRouter:
    r = APIRouter(prefix="/api/intake", tags=["actions"])

    @r.post("/pause")
    def api_pause(request: Request, who: str = Depends(web.actor)) -> dict[str, Any]:
        """Answer C-STORE with 0xA700 (the PACS retries later) until resumed (audited)."""
        return refusal_as_409(lambda: act(web, "pause", 0, who, client_address(request)))

    @r.post("/resume")
    def api_resume(request: Request, who: str = Depends(web.actor)) -> dict[str, Any]:
        """Accept instances again (audited)."""
        return refusal_as_409(lambda: act(web, "resume", 0, who, client_address(request)))

    return r
