"""Can this node reach its destinations?  The record and the board it is posted on.

Two sides meet here without knowing each other: a prober in :mod:`glio_node.send.echo` (the
only place that opens a connection to a PACS) checks each destination in the background and
posts what it found; the status page (:mod:`glio_node.web`) reads the board when it renders, so
a page refresh never opens an association and a slow PACS never slows the page.  The entry
point builds the board and hands it to both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from glio_node.config import Destination

NOT_CHECKED = "not checked yet"


def check_kind(destination: Destination) -> str:
    """How ``destination`` is checked: "C-ECHO" (DIMSE) or "HTTP" (DICOMweb, a GeoJSON endpoint)."""
    return "HTTP" if destination.type in ("dicomweb", "geojson") else "C-ECHO"


@dataclass(frozen=True)
class Reachability:
    """The last check of one destination.

    ``ok`` is None until the first check has answered; ``checked_at`` (UTC) is when it did.
    ``detail`` is a sentence for the operator ("PACS@10.0.0.5:104 answered C-ECHO", "no answer
    (host, port or firewall)", "HTTP 401: check the destination's credentials").
    """

    destination: str  # the [[destinations]] name
    kind: str  # "C-ECHO" or "HTTP"
    ok: bool | None
    detail: str
    checked_at: datetime | None


class ReachabilityBoard:
    """The latest :class:`Reachability` of each configured destination, in configuration order.

    Thread-safe: the prober posts from its thread, the page reads from uvicorn's.  A destination
    not checked yet reads as ``ok=None``, "not checked yet"; a result for a destination that is
    not configured is refused (a prober built from other settings than the page).
    """

    def __init__(self, destinations: Iterable[Destination]):
        self._order = [(d.name, check_kind(d)) for d in destinations]
        self._lock = threading.Lock()
        self._latest: dict[str, Reachability] = {}

    def post(self, result: Reachability) -> None:
        if result.destination not in {name for name, _ in self._order}:
            known = ", ".join(name for name, _ in self._order) or "none"
            raise ValueError(
                f"reachability of {result.destination!r} posted, but the configured destinations are {known}"
            )
        with self._lock:
            self._latest[result.destination] = result

    def all(self) -> list[Reachability]:
        with self._lock:
            return [
                self._latest.get(name) or Reachability(name, kind, None, NOT_CHECKED, None)
                for name, kind in self._order
            ]


__all__ = ["NOT_CHECKED", "Reachability", "ReachabilityBoard", "check_kind"]
