"""What every route is given: the settings, the store, this process, the reachability board.

:func:`glio_node.web.app.create_app` builds one :class:`WebContext` and passes it to each
router's factory (:mod:`glio_node.web.routes`); nothing is read from module globals, so each
test builds its own app over its own store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Settings
from glio_node.reachability import ReachabilityBoard
from glio_node.web import snapshot
from glio_node.web.chart import throughput_svg
from glio_node.web.health import NodeContext, node_health


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    node: NodeContext  # this process: device, bundles, spool, read-only or not
    reachability: ReachabilityBoard  # posted by send/echo's prober; only read here
    templates: Jinja2Templates
    user: Callable[..., str]  # dependency: who is asking (web/auth), 401 without the token
    actor: Callable[..., str]  # dependency: who may act, 403 on the read-only page or cross-origin

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)

    def page_data(self, **extra: Any) -> dict[str, Any]:
        """Everything the page and ``/api/status`` show.

        Health checks run outside the store session: on SQLite every transaction takes the
        write lock, which the receiver also needs.  Reachability is read from the board, never
        checked here.
        """
        status = self.settings.status
        t = self.now()
        health = node_health(self.node, self.sessions, t)
        with self.sessions() as session:
            over = snapshot.overview(session, t)
            if status.show_patient_data:
                over.jobs[:] = [
                    snapshot.JobRow(**{**j.__dict__, "patient": snapshot.patient_of(session, j.series_instance_uid)})
                    for j in over.jobs
                ]
        return {
            "health": health,
            "overview": over,
            "destinations": self.reachability.all(),
            "chart": throughput_svg(over.throughput),
            "refresh_seconds": status.refresh_seconds,
            "read_only": self.node.read_only,
            "show_patient_data": status.show_patient_data,
            **extra,
        }


def client_address(request: Request) -> str | None:
    """``host:port`` of the operator's client, for the audit row of an action."""
    return f"{request.client.host}:{request.client.port}" if request.client else None
