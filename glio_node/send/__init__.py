"""Sending results to destinations: C-STORE SCU (:mod:`.dimse`), STOW-RS (:mod:`.dicomweb`), and
the QuPath GeoJSON by HTTP POST (:mod:`.geojson_http`).

A sender sends a batch of files to one destination and answers one :class:`SendResult` per
file.  When the destination cannot be reached at all (no association, connection refused,
HTTP 5xx) it raises :class:`~glio_node.errors.TransientError` and nothing of the batch counts
as sent.  :mod:`.echo` checks whether each destination answers, for the status page, and
:mod:`.commitment` asks for Storage Commitment.  These are the only modules that open
connections to a PACS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from glio_node.config import Destination


@dataclass(frozen=True)
class SendResult:
    """What the destination said about one object."""

    path: Path
    ok: bool  # stored (a warning status counts as stored)
    status: str  # "0x0000", "0xA700", "HTTP 200", "no presentation context", ...
    transient: bool = False  # a failure worth retrying (out of resources, timeout)


class ResultSender(Protocol):
    """Sends result files to one destination."""

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        """Send ``paths`` in one association / request batch; one result per path, in order.

        Raises ``TransientError`` when the destination cannot be reached.
        """
        ...


def make_sender(destination: Destination, calling_ae_title: str) -> ResultSender:
    """The sender for ``destination``'s type; ``calling_ae_title`` is our AE title (DIMSE)."""
    if destination.type == "dicomweb":
        from glio_node.send.dicomweb import StowSender

        return StowSender(destination)
    if destination.type == "geojson":
        from glio_node.send.geojson_http import GeoJSONPoster

        return GeoJSONPoster(destination)
    from glio_node.send.dimse import DimseSender

    return DimseSender(destination, calling_ae_title)


__all__ = ["ResultSender", "SendResult", "make_sender"]
