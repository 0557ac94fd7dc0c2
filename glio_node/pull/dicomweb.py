"""HTTP to a ``[[sources]]`` DICOMweb server: QIDO-RS search and WADO-RS retrieve (urllib).

What the server answers becomes one of two errors the poller acts on:

- :class:`SourceUnreachable` (a ``TransientError``): connection refused or reset, timeout, HTTP
  5xx or 429, a body cut short.  The next poll tries again.
- :class:`SourceRefused` (a ``PermanentError``): HTTP 401/403 (credentials), other 4xx.  The
  message names the source and what to check; polls go on, so fixing the server side is enough.

Messages carry the source's name and its scheme://host:port only: never the credentials, the
query or a patient's data from an answer.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from glio_node.config import Source
from glio_node.errors import PermanentError, TransientError
from glio_node.http_auth import authorization_header
from glio_node.pull.multipart import MultipartError, boundary_of, split_parts

PAGE = 100  # QIDO-RS results per request (limit/offset)
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# DICOM JSON tags read from QIDO-RS answers
STUDY_INSTANCE_UID = "0020000D"
SERIES_INSTANCE_UID = "0020000E"
STUDY_DATE = "00080020"
NUMBER_OF_SERIES_RELATED_INSTANCES = "00201209"


class SourceUnreachable(TransientError):
    """The source cannot be asked now (down, timing out, overloaded): try again next poll."""


class SourceRefused(PermanentError):
    """The source refused the request (credentials, permissions, an unsupported query)."""


class Stopped(TransientError):
    """The node is stopping: a retrieval in progress was abandoned (taken again next start)."""


@dataclass(frozen=True)
class FoundSeries:
    """One series a QIDO-RS search named."""

    study_instance_uid: str
    series_instance_uid: str
    study_date: str | None  # YYYYMMDD as the server has it; None when absent
    instance_count: int | None  # NumberOfSeriesRelatedInstances; None when not returned


def server_of(url: str) -> str:
    """``scheme://host:port`` of ``url``, without user info, path or query (safe to log)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


class DicomwebSource:
    """QIDO-RS and WADO-RS requests to one source, with its authentication."""

    def __init__(self, source: Source, stopping: threading.Event | None = None):
        self.source = source
        self.root = source.url.rstrip("/")
        self.where = f"source {source.name} ({server_of(source.url)})"
        self.stopping = stopping or threading.Event()

    def _headers(self, accept: str) -> dict[str, str]:
        s = self.source
        return {
            "Accept": accept,
            **authorization_header(
                username=s.username if s.auth == "basic" else "",
                password=s.password if s.auth == "basic" else "",
                bearer_token=s.token if s.auth == "bearer" else "",
            ),
        }

    def _open(self, url: str, accept: str, what: str) -> Any:
        request = urllib.request.Request(url, headers=self._headers(accept), method="GET")
        try:
            return urllib.request.urlopen(request, timeout=self.source.timeout_seconds)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise self._http_error(exc.code, what) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise SourceUnreachable(
                f"{self.where}: {what} failed: {reason}; trying again at the next poll"
            ) from None

    def _http_error(self, code: int, what: str) -> Exception:
        if code in (401, 403):
            check = (
                "the server refused our credentials: check auth, username and password "
                "(or token) of this [[sources]] entry, and GLIO_SOURCES_<n>_PASSWORD / _TOKEN"
                if code == 401
                else "the server accepted our credentials but does not allow this: check the "
                "account's permissions for QIDO-RS and WADO-RS on the server"
            )
            return SourceRefused(f"{self.where}: {what}: HTTP {code}: {check}")
        if code >= 500 or code == 429:
            return SourceUnreachable(
                f"{self.where}: {what}: HTTP {code}; trying again at the next poll"
            )
        return SourceRefused(
            f"{self.where}: {what}: HTTP {code}: check that url is the DICOMweb root "
            "(QIDO-RS answers at <url>/series)"
        )

    # -- QIDO-RS ---------------------------------------------------------------------------

    def search_series(self) -> list[FoundSeries]:
        """Every series of the source's modality the server holds (paged with limit/offset)."""
        return list(self._pages())

    def _pages(self) -> Iterator[FoundSeries]:
        offset = 0
        while True:
            query = urllib.parse.urlencode(
                [
                    ("Modality", self.source.modality),
                    ("includefield", STUDY_DATE),
                    ("includefield", NUMBER_OF_SERIES_RELATED_INSTANCES),
                    ("limit", str(PAGE)),
                    ("offset", str(offset)),
                ]
            )
            with self._open(
                f"{self.root}/series?{query}", "application/dicom+json", "QIDO-RS search"
            ) as response:
                try:
                    body = response.read()
                except OSError as exc:
                    raise SourceUnreachable(f"{self.where}: QIDO-RS answer cut short: {exc}") from None
            try:
                page = json.loads(body) if body.strip() else []  # 204 No Content: nothing found
            except ValueError:
                raise SourceRefused(
                    f"{self.where}: QIDO-RS answer is not DICOM JSON: check that url is the "
                    "DICOMweb root"
                ) from None
            if not isinstance(page, list):
                raise SourceRefused(f"{self.where}: QIDO-RS answer is not a JSON array")
            for item in page:
                found = _found_series(item)
                if found is not None:
                    yield found
            if len(page) != PAGE:  # the last page (or a server that ignores limit)
                return
            offset += PAGE

    # -- WADO-RS ---------------------------------------------------------------------------

    def retrieve_series(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        open_part: Callable[[dict[str, str]], BinaryIO],
    ) -> int:
        """Stream the series' instances, as stored (``transfer-syntax=*``), into ``open_part``
        files; the number of parts.  ``Stopped`` when the node stops meanwhile."""
        url = f"{self.root}/studies/{study_instance_uid}/series/{series_instance_uid}"
        with self._open(url, WADO_ACCEPT, "WADO-RS retrieve") as response:
            try:
                boundary = boundary_of(response.headers.get("Content-Type", ""))
                return split_parts(_Checked(response, self), boundary, open_part)
            except MultipartError as exc:
                raise SourceUnreachable(f"{self.where}: WADO-RS answer unusable: {exc}") from None


class _Checked:
    """The response body, read in chunks; stops when the node stops, maps I/O errors."""

    def __init__(self, response: Any, client: DicomwebSource):
        self.response = response
        self.client = client

    def read(self, size: int = -1, /) -> bytes:
        if self.client.stopping.is_set():
            raise Stopped(f"{self.client.where}: retrieval abandoned, the node is stopping")
        try:
            return self.response.read(size)
        except OSError as exc:
            raise SourceUnreachable(
                f"{self.client.where}: WADO-RS answer cut short: {exc}; trying again at the next poll"
            ) from None


def _found_series(item: Any) -> FoundSeries | None:
    """A QIDO-RS result as a record; None when it lacks the UIDs."""
    if not isinstance(item, dict):
        return None

    def first(tag: str) -> Any:
        element = item.get(tag)
        value = element.get("Value") if isinstance(element, dict) else None
        return value[0] if isinstance(value, list) and value else None

    study, series = first(STUDY_INSTANCE_UID), first(SERIES_INSTANCE_UID)
    if not isinstance(study, str) or not isinstance(series, str):
        return None
    count = first(NUMBER_OF_SERIES_RELATED_INSTANCES)
    try:
        count = int(count) if count is not None else None
    except (TypeError, ValueError):
        count = None
    date = first(STUDY_DATE)
    return FoundSeries(study, series, date if isinstance(date, str) else None, count)
