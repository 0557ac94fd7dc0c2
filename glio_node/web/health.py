"""Node-local health for the status page and /readyz.

:class:`NodeContext` is what the entry point knows about this process (version, start time,
device, bundles, spool); :func:`readiness` checks database, spool and models.  Whether the
destinations answer is not checked here: :mod:`glio_node.send.echo` probes them in the
background and the page reads its :class:`~glio_node.reachability.ReachabilityBoard`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from glio_node import __version__


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
