"""``/api/jobs``: recent jobs, and the operator's retry and re-send of one job (audited)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from glio_node.web import snapshot
from glio_node.web.acting import act, refusal_as_409
from glio_node.web.context import WebContext, client_address


def router(web: WebContext) -> APIRouter:
    r = APIRouter(prefix="/api/jobs")

    @r.get("", tags=["api"])
    def api_jobs(who: str = Depends(web.user), limit: int = 50) -> list[dict[str, Any]]:
        """The most recent jobs, newest first (no patient data)."""
        with web.sessions() as session:
            return snapshot.as_json(snapshot.recent_jobs(session, min(max(limit, 1), 500)))

    @r.post("/{job_id}/retry", tags=["actions"])
    def api_retry(job_id: int, request: Request, who: str = Depends(web.actor)) -> dict[str, Any]:
        """Queue a failed job again (audited)."""
        return refusal_as_409(lambda: act(web, "retry", job_id, who, client_address(request)))

    @r.post("/{job_id}/resend", tags=["actions"])
    def api_resend(job_id: int, request: Request, who: str = Depends(web.actor)) -> dict[str, Any]:
        """Send a done job's results again to every destination (audited)."""
        return refusal_as_409(lambda: act(web, "resend", job_id, who, client_address(request)))

    return r
