"""``/api/status``: what the page shows, as JSON (no patient data unless the setting says so)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from glio_node.web import snapshot
from glio_node.web.context import WebContext


def router(web: WebContext) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["api"])

    @r.get("/status")
    def api_status(who: str = Depends(web.user)) -> dict[str, Any]:
        """Node health, destinations (last reachability check), queue, recent jobs, open
        deliveries, throughput, nodes."""
        data = web.page_data()
        return snapshot.as_json({
            "health": {**data["health"].__dict__, "ready": data["health"].ready},
            "destinations": data["destinations"],
            **data["overview"].__dict__,
        })

    return r
