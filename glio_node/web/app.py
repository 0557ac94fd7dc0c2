"""The status page, JSON API, /metrics, /healthz and /readyz: one FastAPI app per process.

:func:`create_app` is called by the entry point (``serve`` or ``status-page``), never at import
time.  It builds the templates and the auth dependencies (:mod:`glio_node.web.auth`), and
includes one router per resource (:mod:`glio_node.web.routes`).  Everything shown is read from
the store (:mod:`glio_node.web.snapshot`) or from the reachability board that the entry point's
prober (:mod:`glio_node.send.echo`) fills: the web layer opens no connection to a PACS.  The
actions (retry, re-send, pause and resume intake) write to the store with an audit row in the
same transaction (:mod:`glio_node.store.actions`), and the node acts on what the store says.

Access (``[status]``): without a token (allowed only on loopback) everything is open to this
machine; with a token every route but ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <token>`` or HTTP basic auth with the token as password (the user name is
recorded as who acted).  Form posts from another origin are refused.  Search terms travel in
POST bodies, never in URLs, so they stay out of access logs and browser history.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Settings
from glio_node.reachability import ReachabilityBoard
from glio_node.web.auth import READ_ONLY_MESSAGE, actor_dependency, user_dependency
from glio_node.web.context import WebContext
from glio_node.web.filters import FILTERS
from glio_node.web.health import NodeContext
from glio_node.web.routes import audit, health, intake, jobs, metrics, pages, status

ROUTERS = (health, metrics, pages, status, jobs, audit, intake)


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
    posts on; without one every destination reads "not checked yet".
    """
    ctx = ctx or NodeContext()
    templates = Jinja2Templates(directory=str(resources.files("glio_node.web") / "templates"))
    templates.env.filters.update(FILTERS)
    user = user_dependency(settings.status)
    web = WebContext(
        settings=settings,
        sessions=sessions,
        node=ctx,
        reachability=reachability or ReachabilityBoard(settings.destinations),
        templates=templates,
        user=user,
        actor=actor_dependency(user, ctx.read_only),
    )

    app = FastAPI(
        title="glio-node status",
        version=ctx.version,
        description="Health, queue, jobs, deliveries and audit of a glio-node (research use only).",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.mount("/static", StaticFiles(directory=str(resources.files("glio_node.web") / "static")), name="static")
    for module in ROUTERS:
        app.include_router(module.router(web))
    return app


__all__ = ["READ_ONLY_MESSAGE", "create_app"]
