"""``/api/audit/search``: the audit rows of one study, by Study Instance UID or Accession Number.

The terms travel in the POST body, never in the URL, so they stay out of access logs and
browser history.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from glio_node.store.audit import as_dict
from glio_node.web import snapshot
from glio_node.web.context import WebContext


class AuditQuery(BaseModel):
    study_instance_uid: str = ""
    accession_number: str = ""


def router(web: WebContext) -> APIRouter:
    r = APIRouter(prefix="/api/audit", tags=["api"])

    @r.post("/search")
    def api_audit(query: AuditQuery, who: str = Depends(web.user)) -> list[dict[str, Any]]:
        """Audit rows of a study, by Study Instance UID or Accession Number (in the body)."""
        with web.sessions() as session:
            rows = snapshot.audit_search(
                session, study_instance_uid=query.study_instance_uid, accession_number=query.accession_number
            )
            return [as_dict(r) for r in rows]

    return r
