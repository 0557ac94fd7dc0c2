"""C-STORE SCU: one association per batch, one status per object.

Statuses (PS3.4 B.2.3): 0x0000 and warnings 0xB000/0xB006/0xB007 count as stored; 0xA7xx (out
of resources) and no answer at all are transient; everything else (0xA9xx, 0xCxxx, 0x01xx)
is a permanent refusal of that object.  A failed association is a ``TransientError`` for the
whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context

from glio_node.config import Destination
from glio_node.errors import TransientError
from glio_node.redact import redacted_logger
from glio_node.send import SendResult

log = redacted_logger(__name__)

WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


class DimseSender:
    """Sends files to ``destination`` by C-STORE, calling as ``calling_ae_title``."""

    def __init__(
        self,
        destination: Destination,
        calling_ae_title: str,
        *,
        timeout_seconds: float = 60.0,
    ):
        if destination.type != "dimse":
            raise ValueError(f"destination {destination.name!r} is {destination.type}, not dimse")
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.timeout_seconds = timeout_seconds

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        if not paths:
            return []
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        contexts: dict[tuple[str, str], None] = {}
        for h in headers:
            contexts[(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))] = None
        if len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"{len(contexts)} presentation contexts: send smaller batches")
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_seconds
        ae.connection_timeout = min(self.timeout_seconds, 10.0)
        requested = [build_context(sop, [ts]) for sop, ts in contexts]
        dest = self.destination
        assoc = ae.associate(dest.host, dest.port, contexts=requested, ae_title=dest.ae_title)
        if not assoc.is_established:
            why = (
                "association rejected"
                if assoc.is_rejected
                else "no association (connection refused, aborted or timed out)"
            )
            raise TransientError(f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {why}")
        results: list[SendResult] = []
        try:
            for path, header in zip(paths, headers, strict=True):
                results.append(self._store(assoc, Path(path), header))
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        # Objects not tried because the association dropped: transient.
        results += [
            SendResult(Path(p), False, "association lost", transient=True)
            for p in paths[len(results) :]
        ]
        return results

    def _store(self, assoc, path: Path, header: pydicom.Dataset) -> SendResult:
        try:
            rsp = assoc.send_c_store(path)
        except ValueError as exc:  # no accepted presentation context for this SOP class / TS
            return SendResult(path, False, f"not accepted: {exc}"[:64], transient=False)
        if "Status" not in rsp:
            return SendResult(path, False, "no answer", transient=True)
        status = int(rsp.Status)
        text = f"0x{status:04X}"
        if status == 0x0000 or status in WARNING_STATUSES:
            return SendResult(path, True, text)
        return SendResult(path, False, text, transient=(status & 0xFF00) == 0xA700)
