"""The app's routes, one module per resource, each a factory ``router(web) -> APIRouter``.

| module | routes |
| --- | --- |
| :mod:`.health` | ``GET /healthz``, ``GET /readyz`` (no token: for the supervisor and load balancer) |
| :mod:`.metrics` | ``GET /metrics`` (Prometheus, read from the store at scrape time) |
| :mod:`.pages` | ``GET /``, ``POST /audit``, ``POST /actions/{action}`` (the HTML page and its buttons) |
| :mod:`.status` | ``GET /api/status`` (the page as JSON) |
| :mod:`.jobs` | ``GET /api/jobs``, ``POST /api/jobs/{job_id}/retry``, ``POST /api/jobs/{job_id}/resend`` |
| :mod:`.audit` | ``POST /api/audit/search`` (search terms in the body, never in the URL) |
| :mod:`.intake` | ``POST /api/intake/pause``, ``POST /api/intake/resume`` |

Every route reads the store or writes an operator's action to it; none opens a connection to a
PACS (destination reachability is read from the board that ``send/echo``'s prober fills).
"""
