"""Is each destination there?  C-ECHO for DIMSE, one QIDO-RS request for DICOMweb, in the background.

:class:`ReachabilityProber` checks every destination once per ``interval_seconds`` (``[status]
echo_cache_seconds``) in its own thread and posts each answer on a
:class:`~glio_node.reachability.ReachabilityBoard`, which the status page reads.  Checking here
rather than when the page renders keeps the page fast (a firewalled PACS takes the full timeout
to not answer) and bounds what a PACS sees to one association per destination per interval,
however many people keep the page open.  A change of a destination's state is logged once.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from glio_node.config import Destination
from glio_node.http_auth import authorization_header
from glio_node.reachability import Reachability, ReachabilityBoard, check_kind

log = logging.getLogger(__name__)

ECHO_TIMEOUT_SECONDS = 3.0
MIN_INTERVAL_SECONDS = 1.0  # echo_cache_seconds = 0 must not become a busy loop against the PACS


def c_echo(destination: Destination, calling_ae: str, timeout: float = ECHO_TIMEOUT_SECONDS) -> tuple[bool, str]:
    """One association with a Verification context and one C-ECHO: (answered 0x0000, a sentence)."""
    d = destination
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout  # a firewalled host must not hold the prober for minutes
    ae.add_requested_context(Verification)
    assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
    if not assoc.is_established:
        why = "association rejected (check the AE titles)" if assoc.is_rejected else "no answer (host, port or firewall)"
        return False, f"{d.ae_title}@{d.host}:{d.port}: {why}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0:
        return True, f"{d.ae_title}@{d.host}:{d.port} answered C-ECHO"
    if code is None:
        return False, f"{d.ae_title}@{d.host}:{d.port}: no answer to C-ECHO within {timeout:.0f} s"
    return False, f"{d.ae_title}@{d.host}:{d.port}: C-ECHO status 0x{code:04X}"


def http_check(destination: Destination, timeout: float = ECHO_TIMEOUT_SECONDS) -> tuple[bool, str]:
    """A DICOMweb root: ``GET {url}/studies?limit=1``; a GeoJSON endpoint: ``HEAD {url}``.  Any
    answer below 500 but 401/403 means the server is there (a POST-only GeoJSON endpoint may
    refuse HEAD with 405, or 501 "not implemented": it is there too)."""
    d = destination
    headers = {
        "Accept": "application/dicom+json" if d.type == "dicomweb" else "application/json",
        **authorization_header(username=d.username, password=d.password, bearer_token=d.bearer_token),
    }
    if d.type == "dicomweb":
        request = urllib.request.Request(d.url.rstrip("/") + "/studies?limit=1", headers=headers)
    else:
        request = urllib.request.Request(d.url, headers=headers, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return True, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return False, f"HTTP {exc.code}: check the destination's credentials"
        there = exc.code < 500 or (d.type == "geojson" and exc.code == 501)
        return there, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"no answer: {getattr(exc, 'reason', exc)}"


def check(destination: Destination, calling_ae: str, timeout: float = ECHO_TIMEOUT_SECONDS) -> Reachability:
    """Check ``destination`` once, by its type; the answer is stamped with the time it came."""
    if destination.type in ("dicomweb", "geojson"):
        ok, detail = http_check(destination, timeout)
    else:
        ok, detail = c_echo(destination, calling_ae, timeout)
    return Reachability(destination.name, check_kind(destination), ok, detail, datetime.now(UTC))


class ReachabilityProber:
    """Checks ``destinations`` every ``interval_seconds`` and posts the answers on ``board``.

    :meth:`check_all` is one round, in the caller's thread; :meth:`start` runs rounds in a
    daemon thread (the first at once) until :meth:`stop`.
    """

    def __init__(
        self,
        destinations: Sequence[Destination],
        calling_ae: str,
        board: ReachabilityBoard,
        interval_seconds: float,
        *,
        timeout_seconds: float = ECHO_TIMEOUT_SECONDS,
    ):
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds = {timeout_seconds}: must be more than 0 seconds")
        self.destinations = tuple(destinations)
        self.calling_ae = calling_ae
        self.board = board
        self.interval = max(float(interval_seconds), MIN_INTERVAL_SECONDS)
        self.timeout = timeout_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok: dict[str, bool] = {}

    def check_all(self) -> list[Reachability]:
        """Check every destination once, post each answer as it comes, return them in order."""
        results = []
        for d in self.destinations:
            if self._stop.is_set():
                break
            try:
                result = check(d, self.calling_ae, self.timeout)
            except Exception as exc:  # noqa: BLE001 - any failure of the check means "not reachable"; say which
                # (pynetdicom raises on some malformed addresses instead of failing the
                # association; the prober thread must outlive that and keep checking the rest.)
                result = Reachability(
                    d.name, check_kind(d), False, f"the check failed: {type(exc).__name__}: {exc}", datetime.now(UTC)
                )
            self._note_change(result)
            self.board.post(result)
            results.append(result)
        return results

    def start(self) -> ReachabilityProber:
        if self._thread is not None:
            raise RuntimeError("this prober was started already; build a new one")
        if self.destinations:
            self._thread = threading.Thread(target=self._run, name="glio-reachability", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to end and wait for it at most ``timeout`` s.

        A check under way may take up to three timeouts (connect, associate, C-ECHO); the
        daemon thread is left to finish it rather than hold up the node's shutdown.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_all()
            self._stop.wait(self.interval)

    def _note_change(self, result: Reachability) -> None:
        before = self._last_ok.get(result.destination)
        self._last_ok[result.destination] = bool(result.ok)
        if before == result.ok:
            return
        if result.ok:
            log.info("destination %s reachable (%s): %s", result.destination, result.kind, result.detail)
        else:
            log.warning("destination %s not reachable (%s): %s", result.destination, result.kind, result.detail)


__all__ = ["ECHO_TIMEOUT_SECONDS", "ReachabilityProber", "c_echo", "check", "http_check"]
