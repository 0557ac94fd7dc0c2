"""The HTML page: ``GET /``, the audit search form (``POST /audit``) and the buttons
(``POST /actions/{action}``, then back to the page with one of our own sentences)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from glio_node.store import actions
from glio_node.web import snapshot
from glio_node.web.acting import act
from glio_node.web.context import WebContext, client_address

MESSAGES = {
    "retry": "The job was queued again.",
    "resend": "The results will be sent again.",
    "pause": "Intake paused: the node answers C-STORE with 0xA700 and the PACS sends again later.",
    "resume": "Intake resumed.",
}


def known_message(key: str) -> str:
    """Only our own sentences: a query parameter must never put text on the page."""
    return MESSAGES.get(key, "")


def router(web: WebContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/", response_class=HTMLResponse)
    def page(request: Request, who: str = Depends(web.user), message: str = "") -> HTMLResponse:
        data = web.page_data(message=known_message(message))
        return web.templates.TemplateResponse(request, "status.html", data)

    @r.post("/audit", response_class=HTMLResponse)
    def page_audit(
        request: Request,
        who: str = Depends(web.user),
        study_instance_uid: str = Form(""),
        accession_number: str = Form(""),
    ) -> HTMLResponse:
        with web.sessions() as session:
            rows = snapshot.audit_search(
                session, study_instance_uid=study_instance_uid, accession_number=accession_number
            )
        data = web.page_data(audit_rows=rows, audit_searched=True)
        return web.templates.TemplateResponse(request, "status.html", data)

    @r.post("/actions/{action}")
    def page_action(action: str, request: Request, who: str = Depends(web.actor), job_id: int = Form(0)) -> Response:
        """The page's buttons: the same actions as the API, then back to the page."""
        try:
            act(web, action, job_id, who, client_address(request))
        except actions.ActionRefused as exc:
            return web.templates.TemplateResponse(request, "refused.html", {"message": str(exc)}, status_code=409)
        return RedirectResponse(f"/?message={action}", status_code=303)

    return r
