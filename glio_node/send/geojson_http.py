"""HTTP POST of each job's QuPath GeoJSON to a ``type = "geojson"`` destination.

Vendor AI integrations and image-analysis services take GeoJSON, not DICOM.  Each file is one
``POST {url}`` with ``Content-Type: application/geo+json`` and the file name in
``Content-Disposition`` (``<slide Series Instance UID>-<bundle>.geojson``: a re-run posts the
same name, so a receiver can replace rather than add), with the destination's basic or bearer
authentication.  Answers, per file: 2xx stored; 5xx, 429 and no connection are transient
(retried with the delivery backoff, like a PACS that is down); any other status is a permanent
refusal.  Each attempt is audited (``delivery_attempt``) by the scheduler, as for DICOM objects.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from glio_node.config import Destination
from glio_node.http_auth import authorization_header
from glio_node.send import SendResult

MEDIA_TYPE = "application/geo+json"
GEOJSON_CLASS = "geojson"
"""What a delivery row holds as ``sop_class_uid`` for a GeoJSON file (it is not a DICOM object)."""


class GeoJSONPoster:
    """Posts GeoJSON files to one HTTP endpoint, one request per file."""

    def __init__(self, destination: Destination, *, timeout_seconds: float = 60.0):
        if destination.type != "geojson":
            raise ValueError(f"destination {destination.name!r} is {destination.type}, not geojson")
        self.destination = destination
        self.timeout_seconds = timeout_seconds

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        return [self._post(Path(p)) for p in paths]

    def _post(self, path: Path) -> SendResult:
        d = self.destination
        headers = {
            "Content-Type": MEDIA_TYPE,
            "Content-Disposition": f'attachment; filename="{path.name}"',
            **authorization_header(username=d.username, password=d.password, bearer_token=d.bearer_token),
        }
        request = urllib.request.Request(d.url, data=path.read_bytes(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                code = response.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        except (urllib.error.URLError, OSError) as exc:
            return SendResult(path, False, f"no answer: {getattr(exc, 'reason', exc)}", transient=True)
        status = f"HTTP {code}"
        if 200 <= code < 300:
            return SendResult(path, True, status)
        if code in (401, 403):
            return SendResult(path, False, f"{status}: check the destination's credentials")
        return SendResult(path, False, status, transient=code >= 500 or code == 429)
