"""Node-local health for the status page and /readyz, and the destinations' reachability.

:class:`NodeContext` is what the entry point knows about this process (version, start time,
device, bundles, spool); :func:`readiness` checks database, spool and models; :class:`EchoCache`
answers "can we reach this destination?" by C-ECHO (DIMSE) or an HTTP request (DICOMweb), at
most once per ``[status] echo_cache_seconds`` per destination, so a page refresh never floods a
PACS.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from glio_node import __version__
from glio_node.config import Destination

ECHO_TIMEOUT_SECONDS = 3.0


@dataclass
class NodeContext:
    """What the status page knows about the process serving it."""

    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    version: str = __version__
    device: str | None = None  # "cpu" / "gpu:0" as chosen by the worker; None: no worker here
    bundles: list[tuple[str, str]] = field(default_factory=list)  # (name, version) loaded
    spool_dir: Path | None = None
    min_free_bytes: int = 0
    models_ready: Callable[[], bool] = lambda: True
    read_only: bool = False  # `glio-node status-page`: no actions


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    version: str
    uptime_seconds: float
    device: str | None
    cpu_count: int
    load_average: tuple[float, float, float] | None
    bundles: list[tuple[str, str]]
    spool_free_bytes: int | None
    checks: list[Check]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)


def spool_free_bytes(ctx: NodeContext) -> int | None:
    if ctx.spool_dir is None or not Path(ctx.spool_dir).exists():
        return None
    return shutil.disk_usage(ctx.spool_dir).free


def readiness(ctx: NodeContext, sessions: sessionmaker[Session]) -> list[Check]:
    """Database reachable, spool present with room, models loaded (each with a sentence)."""
    checks = []
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        checks.append(Check("database", True, "reachable"))
    except Exception as exc:  # noqa: BLE001 - any driver error means "not reachable"; say which
        checks.append(Check("database", False, f"not reachable ({type(exc).__name__}): check [storage] database_url"))
    if ctx.spool_dir is not None:
        free = spool_free_bytes(ctx)
        if free is None:
            checks.append(Check("spool", False, f"spool folder {ctx.spool_dir} does not exist"))
        elif free < ctx.min_free_bytes:
            checks.append(Check("spool", False, f"{free} bytes free, under min_free_bytes {ctx.min_free_bytes}: free disk space"))
        elif not os.access(ctx.spool_dir, os.W_OK):
            checks.append(Check("spool", False, f"spool folder {ctx.spool_dir} is not writable"))
        else:
            checks.append(Check("spool", True, f"{free / 1e9:.1f} GB free"))
    if not ctx.read_only:
        ok = ctx.models_ready()
        checks.append(Check("models", ok, "loaded" if ok else "not loaded yet"))
    return checks


def node_health(ctx: NodeContext, sessions: sessionmaker[Session], now: datetime) -> Health:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return Health(
        version=ctx.version,
        uptime_seconds=(now - ctx.started_at).total_seconds(),
        device=ctx.device,
        cpu_count=os.cpu_count() or 1,
        load_average=load,
        bundles=list(ctx.bundles),
        spool_free_bytes=spool_free_bytes(ctx),
        checks=readiness(ctx, sessions),
    )


@dataclass(frozen=True)
class Reachability:
    destination: str
    kind: str  # "C-ECHO" or "HTTP"
    ok: bool
    detail: str
    checked_at: datetime


class EchoCache:
    """Destination reachability, checked at most every ``ttl_seconds`` per destination."""

    def __init__(self, destinations: tuple[Destination, ...], calling_ae: str, ttl_seconds: float):
        self.destinations = destinations
        self.calling_ae = calling_ae
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Reachability]] = {}

    def all(self) -> list[Reachability]:
        with self._lock:  # one checker at a time; others wait and read the cache
            out = []
            for d in self.destinations:
                hit = self._cache.get(d.name)
                if hit is None or time.monotonic() - hit[0] >= self.ttl:
                    hit = (time.monotonic(), self._check(d))
                    self._cache[d.name] = hit
                out.append(hit[1])
            return out

    def _check(self, d: Destination) -> Reachability:
        now = datetime.now(UTC)
        if d.type in ("dicomweb", "geojson"):
            ok, detail = _http_check(d)
            return Reachability(d.name, "HTTP", ok, detail, now)
        ok, detail = _c_echo(d, self.calling_ae)
        return Reachability(d.name, "C-ECHO", ok, detail, now)


def _c_echo(d: Destination, calling_ae: str) -> tuple[bool, str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT_SECONDS
    ae.connection_timeout = ECHO_TIMEOUT_SECONDS  # a firewalled host must not hang the page
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
    return False, f"{d.ae_title}@{d.host}:{d.port}: C-ECHO status {code!r}"


def _http_check(d: Destination) -> tuple[bool, str]:
    """Any HTTP answer below 500 from the DICOMweb root (a GeoJSON endpoint: a HEAD of its URL,
    which may well answer 405) means the server is there."""
    from glio_node.http_auth import authorization_header

    headers = {
        "Accept": "application/dicom+json" if d.type == "dicomweb" else "application/json",
        **authorization_header(username=d.username, password=d.password, bearer_token=d.bearer_token),
    }
    if d.type == "dicomweb":
        request = urllib.request.Request(d.url.rstrip("/") + "/studies?limit=1", headers=headers)
    else:
        request = urllib.request.Request(d.url, headers=headers, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=ECHO_TIMEOUT_SECONDS) as response:
            return True, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return False, f"HTTP {exc.code}: check the destination's credentials"
        # A POST-only GeoJSON endpoint may refuse HEAD (405, or 501 "not implemented"): it is there.
        there = exc.code < 500 or (d.type == "geojson" and exc.code == 501)
        return there, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"no answer: {getattr(exc, 'reason', exc)}"
