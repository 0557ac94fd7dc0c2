"""The operator's actions, shared by the page's buttons and the JSON API.

Each action changes the store and writes its audit row in one transaction
(:mod:`glio_node.store.actions`); the node acts on what the store says.  A refusal
(:class:`~glio_node.store.actions.ActionRefused`: "only a failed job can be retried") is
answered 409 by the API and shown as a page by the buttons.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

from glio_node.store import actions
from glio_node.web.context import WebContext

ACTIONS = ("retry", "resend", "pause", "resume")


def act(web: WebContext, action: str, job_id: int, who: str, address: str | None) -> dict[str, Any]:
    """Do ``action`` (``job_id`` for retry / resend) as ``who`` from ``address``; what changed."""
    with web.sessions.begin() as session:
        if action == "retry":
            actions.retry_job(session, job_id, web.now(), by=who, address=address)
            return {"job_id": job_id, "state": "waiting"}
        if action == "resend":
            n = actions.resend_job(session, job_id, web.now(), by=who, address=address)
            return {"job_id": job_id, "objects": n}
        if action in ("pause", "resume"):
            actions.set_intake_paused(session, action == "pause", web.now(), by=who, address=address)
            return {"intake_paused": action == "pause"}
    raise HTTPException(404, f"no action {action!r}: use {', '.join(ACTIONS)}")


def refusal_as_409(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return call()
    except actions.ActionRefused as exc:
        raise HTTPException(409, str(exc)) from exc
