"""Serve the status app with uvicorn in a background thread (``glio-node serve``) or in the
foreground (``glio-node status-page``)."""

from __future__ import annotations

import threading
import time
from typing import Any

from glio_node.config import StatusSettings
from glio_node.errors import ConfigError


def _config(app: Any, status: StatusSettings) -> Any:
    import uvicorn

    # No access log: paths carry no patient data, but an operator's client addresses and
    # every refresh are noise in the node's log; actions are in the audit trail instead.
    return uvicorn.Config(
        app, host=status.host, port=status.port, log_level="warning", access_log=False,
        lifespan="off", server_header=False,
    )


class StatusServer:
    """uvicorn in a daemon thread; :meth:`stop` ends it (the node's SIGTERM path calls it)."""

    def __init__(self, app: Any, status: StatusSettings):
        import uvicorn

        self.status = status
        self.server = uvicorn.Server(_config(app, status))
        self.thread = threading.Thread(target=self.server.run, name="glio-status", daemon=True)

    def start(self, timeout: float = 15.0) -> StatusServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise ConfigError(
                    f"[status] the status page could not listen on {self.status.host}:{self.status.port} "
                    "(port in use or address not on this machine): change [status] port or host, "
                    "or set [status] enabled = false"
                )
            if time.monotonic() > deadline:
                raise ConfigError(f"[status] the status page did not start within {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_foreground(app: Any, status: StatusSettings) -> None:
    """Run until SIGTERM / SIGINT, then return (exit 0, as ``serve`` does).

    uvicorn handles the signal itself, then re-raises it to the handler that was there before:
    ours only notes it, so a clean stop does not end the process with "killed by SIGTERM".
    """
    import signal

    import uvicorn

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: None)
    server = uvicorn.Server(_config(app, status))
    server.run()
    if not server.started:
        raise ConfigError(
            f"[status] the status page could not listen on {status.host}:{status.port}: "
            "change [status] port or host"
        )
