"""The status page, JSON API, /metrics, /healthz and /readyz: one FastAPI app per process.

:func:`create_app` is called by the entry point (``serve`` or ``status-page``), never at import
time.  Everything shown is read from the store (:mod:`glio_node.web.snapshot`); the actions
(retry, re-send, pause and resume intake) write to the store with an audit row in the same
transaction (:mod:`glio_node.store.actions`), and the node acts on what the store says.

Access (``[status]``): without a token (allowed only on loopback) everything is open to this
machine; with a token every route but ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <token>`` or HTTP basic auth with the token as password (the user name is
recorded as who acted).  Form posts from another origin are refused.  Search terms travel in
POST bodies, never in URLs, so they stay out of access logs and browser history.
"""

from __future__ import annotations

import base64
import hmac
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Settings
from glio_node.reachability import ReachabilityBoard
from glio_node.store import actions
from glio_node.web import snapshot
from glio_node.web.chart import throughput_svg
from glio_node.web.health import NodeContext, node_health, readiness
from glio_node.web.metrics import make_registry

READ_ONLY_MESSAGE = (
    "this is the read-only status page (glio-node status-page): act from the page of a node "
    "started with glio-node serve"
)


class AuditQuery(BaseModel):
    study_instance_uid: str = ""
    accession_number: str = ""


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session],
    ctx: NodeContext | None = None,
    *,
    reachability: ReachabilityBoard | None = None,
) -> FastAPI:
    """The app for ``settings`` over the store behind ``sessions``.

    ``ctx``: what this process knows about itself (device, bundles, spool; ``read_only`` for
    ``status-page``).  ``reachability``: the board a :class:`glio_node.send.echo.ReachabilityProber`
    posts on; without one every destination reads "not checked yet".  The page only reads it.
    """
    ctx = ctx or NodeContext()
    status = settings.status
    board = reachability or ReachabilityBoard(settings.destinations)
    registry = make_registry(sessions, ctx)
    templates = Jinja2Templates(directory=str(resources.files("glio_node.web") / "templates"))
    templates.env.filters["duration"] = _duration
    templates.env.filters["bytes"] = _bytes
    templates.env.filters["short"] = _short_uid
    templates.env.filters["when"] = lambda t: "" if t is None else f"{t:%Y-%m-%d %H:%M:%S}"

    app = FastAPI(
        title="glio-node status",
        version=ctx.version,
        description="Health, queue, jobs, deliveries and audit of a glio-node (research use only).",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.mount("/static", StaticFiles(directory=str(resources.files("glio_node.web") / "static")), name="static")

    def user(request: Request) -> str:
        """Who is asking: the basic-auth user, "token" for a bearer token, "local" without one."""
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

    def actor(request: Request, who: str = Depends(user)) -> str:
        """An operator allowed to act: not on the read-only page, not from another origin."""
        if ctx.read_only:
            raise HTTPException(403, READ_ONLY_MESSAGE)
        # A browser sends Origin on every form post; "null" comes from sandboxed frames and
        # file: pages, i.e. never from this page, so it is refused like any other origin.
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            raise HTTPException(403, f"form posted from another origin ({origin}): refused")
        return who

    def now() -> datetime:
        return datetime.now(UTC)

    def page_data(**extra: Any) -> dict[str, Any]:
        """Everything the page shows.  Health checks run outside the store session: on SQLite
        every transaction takes the write lock, which the receiver also needs.  Reachability is
        read from the board, never checked here."""
        t = now()
        health = node_health(ctx, sessions, t)
        reach = board.all()
        with sessions() as session:
            over = snapshot.overview(session, t)
            if status.show_patient_data:
                over.jobs[:] = [
                    snapshot.JobRow(**{**j.__dict__, "patient": snapshot.patient_of(session, j.series_instance_uid)})
                    for j in over.jobs
                ]
        return {
            "health": health,
            "overview": over,
            "destinations": reach,
            "chart": throughput_svg(over.throughput),
            "refresh_seconds": status.refresh_seconds,
            "read_only": ctx.read_only,
            "show_patient_data": status.show_patient_data,
            **extra,
        }

    # -- probes ----------------------------------------------------------------------------

    @app.get("/healthz", response_class=PlainTextResponse, tags=["probes"])
    def healthz() -> str:
        """The process is alive (answers HTTP)."""
        return "ok\n"

    @app.get("/readyz", tags=["probes"])
    def readyz() -> JSONResponse:
        """Database reachable, spool present with room, models loaded; 503 otherwise."""
        checks = readiness(ctx, sessions)
        ok = all(c.ok for c in checks)
        return JSONResponse(
            {"ready": ok, "checks": [c.__dict__ for c in checks]}, status_code=200 if ok else 503
        )

    @app.get("/metrics", tags=["probes"], dependencies=[Depends(user)])
    def metrics() -> Response:
        """Prometheus text format, read from the store at scrape time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- page ------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request, who: str = Depends(user), message: str = "") -> HTMLResponse:
        data = page_data(message=_known_message(message))
        return templates.TemplateResponse(request, "status.html", data)

    @app.post("/audit", response_class=HTMLResponse, include_in_schema=False)
    def page_audit(
        request: Request,
        who: str = Depends(user),
        study_instance_uid: str = Form(""),
        accession_number: str = Form(""),
    ) -> HTMLResponse:
        with sessions() as session:
            rows = snapshot.audit_search(
                session, study_instance_uid=study_instance_uid, accession_number=accession_number
            )
        data = page_data(audit_rows=rows, audit_searched=True)
        return templates.TemplateResponse(request, "status.html", data)

    @app.post("/actions/{action}", include_in_schema=False)
    def page_action(action: str, request: Request, who: str = Depends(actor), job_id: int = Form(0)) -> Response:
        """The page's buttons: the same actions as the API, then back to the page."""
        try:
            _act(action, job_id, who, request)
        except actions.ActionRefused as exc:
            return templates.TemplateResponse(request, "refused.html", {"message": str(exc)}, status_code=409)
        return RedirectResponse(f"/?message={action}", status_code=303)

    # -- JSON API --------------------------------------------------------------------------

    @app.get("/api/status", tags=["api"])
    def api_status(who: str = Depends(user)) -> dict[str, Any]:
        """Node health, destinations, queue, recent jobs, open deliveries, throughput, nodes."""
        data = page_data()
        return snapshot.as_json({
            "health": {**data["health"].__dict__, "ready": data["health"].ready},
            "destinations": data["destinations"],
            **data["overview"].__dict__,
        })

    @app.get("/api/jobs", tags=["api"])
    def api_jobs(who: str = Depends(user), limit: int = 50) -> list[dict[str, Any]]:
        """The most recent jobs, newest first (no patient data)."""
        with sessions() as session:
            return snapshot.as_json(snapshot.recent_jobs(session, min(max(limit, 1), 500)))

    @app.post("/api/audit/search", tags=["api"])
    def api_audit(query: AuditQuery, who: str = Depends(user)) -> list[dict[str, Any]]:
        """Audit rows of a study, by Study Instance UID or Accession Number (in the body)."""
        from glio_node.store.audit import as_dict

        with sessions() as session:
            rows = snapshot.audit_search(
                session, study_instance_uid=query.study_instance_uid, accession_number=query.accession_number
            )
            return [as_dict(r) for r in rows]

    @app.post("/api/jobs/{job_id}/retry", tags=["actions"])
    def api_retry(job_id: int, request: Request, who: str = Depends(actor)) -> dict[str, Any]:
        """Queue a failed job again (audited)."""
        return _refusal_as_409(lambda: _act("retry", job_id, who, request))

    @app.post("/api/jobs/{job_id}/resend", tags=["actions"])
    def api_resend(job_id: int, request: Request, who: str = Depends(actor)) -> dict[str, Any]:
        """Send a done job's results again to every destination (audited)."""
        return _refusal_as_409(lambda: _act("resend", job_id, who, request))

    @app.post("/api/intake/pause", tags=["actions"])
    def api_pause(request: Request, who: str = Depends(actor)) -> dict[str, Any]:
        """Answer C-STORE with 0xA700 (the PACS retries later) until resumed (audited)."""
        return _refusal_as_409(lambda: _act("pause", 0, who, request))

    @app.post("/api/intake/resume", tags=["actions"])
    def api_resume(request: Request, who: str = Depends(actor)) -> dict[str, Any]:
        """Accept instances again (audited)."""
        return _refusal_as_409(lambda: _act("resume", 0, who, request))

    def _act(action: str, job_id: int, who: str, request: Request) -> dict[str, Any]:
        address = f"{request.client.host}:{request.client.port}" if request.client else None
        with sessions.begin() as session:
            if action == "retry":
                actions.retry_job(session, job_id, now(), by=who, address=address)
                return {"job_id": job_id, "state": "waiting"}
            if action == "resend":
                n = actions.resend_job(session, job_id, now(), by=who, address=address)
                return {"job_id": job_id, "objects": n}
            if action in ("pause", "resume"):
                actions.set_intake_paused(session, action == "pause", now(), by=who, address=address)
                return {"intake_paused": action == "pause"}
        raise HTTPException(404, f"no action {action!r}: use retry, resend, pause or resume")

    return app


def _refusal_as_409(call: Any) -> dict[str, Any]:
    try:
        return call()
    except actions.ActionRefused as exc:
        raise HTTPException(409, str(exc)) from exc


_MESSAGES = {
    "retry": "The job was queued again.",
    "resend": "The results will be sent again.",
    "pause": "Intake paused: the node answers C-STORE with 0xA700 and the PACS sends again later.",
    "resume": "Intake resumed.",
}


def _known_message(key: str) -> str:
    # Only our own sentences: a query parameter must never put text on the page.
    return _MESSAGES.get(key, "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _short_uid(uid: str | None) -> str:
    """The tail of a UID: enough to tell series apart on one page, short enough to read."""
    if not uid:
        return ""
    return uid if len(uid) <= 16 else "…" + uid[-12:]
