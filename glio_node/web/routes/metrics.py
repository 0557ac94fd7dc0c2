"""``/metrics``: Prometheus text format, collected from the store at scrape time (token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glio_node.web.context import WebContext
from glio_node.web.metrics import make_registry


def router(web: WebContext) -> APIRouter:
    registry = make_registry(web.sessions, web.node)  # one per app: each test app has its own
    r = APIRouter(tags=["probes"])

    @r.get("/metrics", dependencies=[Depends(web.user)])
    def metrics() -> Response:
        """Prometheus text format, read from the store at scrape time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return r
