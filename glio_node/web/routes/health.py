"""``/healthz`` (the process answers) and ``/readyz`` (database, spool, models): no token needed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from glio_node.web.context import WebContext
from glio_node.web.health import readiness


def router(web: WebContext) -> APIRouter:
    r = APIRouter(tags=["probes"])

    @r.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        """The process is alive (answers HTTP)."""
        return "ok\n"

    @r.get("/readyz")
    def readyz() -> JSONResponse:
        """Database reachable, spool present with room, models loaded; 503 otherwise."""
        checks = readiness(web.node, web.sessions)
        ok = all(c.ok for c in checks)
        return JSONResponse({"ready": ok, "checks": [c.__dict__ for c in checks]}, status_code=200 if ok else 503)

    return r
