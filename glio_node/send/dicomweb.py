"""STOW-RS: ``POST {url}/studies`` with one multipart/related request per batch.

PS3.18 10.5: 200 all stored; 202 some stored (FailedSOPSequence (0008,1198) names the others);
409 none stored.  5xx, 429 and connection errors are ``TransientError`` for the whole batch;
4xx other than 409 is a permanent refusal of every object in the batch.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

import pydicom

from glio_node.config import Destination
from glio_node.errors import TransientError
from glio_node.http_auth import authorization_header
from glio_node.send import SendResult

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


class StowSender:
    """Sends files to a DICOMweb destination by STOW-RS."""

    def __init__(self, destination: Destination, *, timeout_seconds: float = 120.0):
        if destination.type != "dicomweb":
            raise ValueError(f"destination {destination.name!r} is {destination.type}, not dicomweb")
        self.destination = destination
        self.timeout_seconds = timeout_seconds

    def _headers(self, boundary: str) -> dict[str, str]:
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        d = self.destination
        headers.update(
            authorization_header(
                username=d.username, password=d.password, bearer_token=d.bearer_token
            )
        )
        return headers

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        if not paths:
            return []
        boundary = uuid.uuid4().hex
        body = bytearray()
        uids = []
        for p in paths:
            uids.append(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += Path(p).read_bytes()
            body += b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        url = self.destination.url.rstrip("/") + "/studies"
        request = urllib.request.Request(
            url, data=bytes(body), headers=self._headers(boundary), method="POST"
        )
        where = f"{self.destination.name} ({url})"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                code, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            code, payload = exc.code, exc.read()
            if code >= 500 or code == 429:
                raise TransientError(f"{where}: HTTP {code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"{where}: {getattr(exc, 'reason', exc)}") from exc
        status = f"HTTP {code}"
        if code not in (200, 202, 409):
            return [SendResult(Path(p), False, status) for p in paths]
        failed = _failed_uids(payload)
        if code == 409 and not failed:
            failed = {uid: "409" for uid in uids}
        return [
            SendResult(Path(p), uid not in failed, status if uid not in failed else f"{status} reason {failed[uid]}")
            for p, uid in zip(paths, uids, strict=True)
        ]


def _failed_uids(payload: bytes) -> dict[str, str]:
    """SOP Instance UID -> failure reason from a STOW-RS response (JSON; empty if none)."""
    try:
        doc = json.loads(payload or b"{}")
    except ValueError:
        return {}
    failed: dict[str, str] = {}
    for item in (doc.get(FAILED_SOP_SEQUENCE) or {}).get("Value", []) if isinstance(doc, dict) else []:
        uid = (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value", [""])[0]
        reason = (item.get(FAILURE_REASON) or {}).get("Value", [""])[0]
        failed[str(uid)] = f"0x{int(reason):04X}" if isinstance(reason, int) else str(reason)
    return failed
